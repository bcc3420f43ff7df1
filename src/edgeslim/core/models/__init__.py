"""Model zoo, model sources and saving/loading of whole models."""
