crash       6.4s hf-convnext int8- KeyError at support_matrix.py:455: 'int8-'
