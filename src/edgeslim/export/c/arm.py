"""The generated C built for a Cortex-M and run on QEMU's emulated MPS2 boards.

``arm-none-eabi-gcc`` (Debian: ``gcc-arm-none-eabi``, ``libnewlib-arm-none-eabi``) compiles
``model.c`` for the device's core (``-mcpu=cortex-m4`` / ``-m7``, ``-mthumb``, hard-float
ABI) and links it with a minimal start-up (``templates/arm_startup.c``: vector table, reset
handler; ``templates/arm.ld``) and a test driver (``templates/arm_harness.c``) into an ELF
that ``qemu-system-arm`` (Debian: ``qemu-system-arm``) runs on ``-machine mps2-an386``
(Cortex-M4) or ``mps2-an500`` (Cortex-M7). The driver reads its inputs and writes its
outputs through semihosting.

What is measured, and how:

- **flash**: ``.text + .rodata + .data`` that ``model.o`` contributes to the linked image (the
  link map; the driver, start-up and C library are excluded), i.e. code and constants of
  the model; the whole image's figures (``arm-none-eabi-size``) are kept as well;
- **SRAM**: the model's ``.bss`` + ``.data`` (the arena) from the link map, plus the stack
  measured by stack painting (bytes below the caller's stack pointer that ``model_run``
  wrote), plus the caller's input and output buffers;
- **instructions**: QEMU runs with ``-icount shift=0``, so the virtual clock advances 1 ns per
  executed instruction; the driver reads SysTick (clocked from the board's 25 MHz system
  clock) around ``model_run`` and converts ticks to instructions by a calibration loop of
  known instruction count run first. This counts instructions, not cycles: QEMU models no
  pipeline, wait states or caches (a Cortex-M4 takes 1-3 cycles for most instructions, more
  for loads from flash with wait states).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np

from edgeslim.core.errors import ExportError
from edgeslim.core.fileio import ScratchDir
from edgeslim.export.c.codegen import template
from edgeslim.export.int8 import ir, reference

TOOLCHAIN = "arm-none-eabi-gcc"
QEMU = "qemu-system-arm"
APT_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm")
CALIB_INSTRUCTIONS_PER_LOOP = 2  # subs + bne


@dataclass(frozen=True)
class Core:
    """A Cortex-M core: its compiler flags and the QEMU board that emulates it."""

    name: str
    flags: tuple[str, ...]
    machine: str


CORES = {
    "cortex-m4": Core(
        "cortex-m4",
        ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
        "mps2-an386",
    ),
    "cortex-m7": Core(
        "cortex-m7",
        ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"),
        "mps2-an500",
    ),
}

CFLAGS = (
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-common",
)


def toolchain() -> str | None:
    """Path of ``arm-none-eabi-gcc``, if installed."""
    return shutil.which(TOOLCHAIN)


def qemu() -> str | None:
    """Path of ``qemu-system-arm``, if installed."""
    return shutil.which(QEMU)


def missing() -> str:
    """Why an ARM build or run cannot happen here ('' when it can)."""
    absent = [name for name, path in ((TOOLCHAIN, toolchain()), (QEMU, qemu())) if not path]
    if not absent:
        return ""
    return (
        f"{' and '.join(absent)} not installed (Debian: apt-get install {' '.join(APT_PACKAGES)})"
    )


def core_of(core: str) -> Core:
    key = core.lower()
    if key not in CORES:
        raise ExportError(f"no ARM build for core {core!r}; supported: {', '.join(sorted(CORES))}")
    return CORES[key]


@dataclass
class QemuRun:
    """Outputs and measurements of one QEMU run (one entry per input)."""

    outputs: np.ndarray  # (N, output size) int64
    instructions: list[int]  # per inference
    stack_bytes: list[int]  # per inference
    instructions_per_tick: float


@dataclass
class ArmBuild:
    """Sizes of the ARM link (and a QEMU run's measurements, once run)."""

    core: str
    machine: str
    opt: str
    model: dict[str, int]  # text, rodata, data, bss contributed by model.o
    image: dict[str, int]  # arm-none-eabi-size of the whole ELF: text, data, bss
    io_bytes: int
    run: QemuRun | None = None
    verified: list[str] = field(default_factory=list)

    @property
    def flash(self) -> int:
        """Flash of the model: its code, constants and .data initializers."""
        return self.model["text"] + self.model["rodata"] + self.model["data"]

    @property
    def static_ram(self) -> int:
        """The model's .data + .bss (the arena)."""
        return self.model["data"] + self.model["bss"]

    @property
    def stack(self) -> int | None:
        return max(self.run.stack_bytes) if self.run else None

    @property
    def sram(self) -> int | None:
        """Arena + measured stack + the caller's input and output buffers."""
        return None if self.run is None else self.static_ram + self.stack + self.io_bytes

    @property
    def instructions(self) -> int | None:
        return int(np.median(self.run.instructions)) if self.run else None

    def summary(self) -> str:
        m = self.model
        text = (
            f"ARM build ({self.core}, {self.opt}): flash {self.flash:,} B (text {m['text']:,} "
            f"+ rodata {m['rodata']:,} + data {m['data']:,}), static RAM {self.static_ram:,} B"
        )
        if self.run is not None:
            text += (
                f"; on QEMU {self.machine}: stack {self.stack:,} B (painted), SRAM "
                f"{self.sram:,} B with {self.io_bytes:,} B of caller I/O, "
                f"{self.instructions:,} instructions per inference (-icount)"
            )
        return text


def _map_sizes(text: str, obj: str) -> dict[str, int]:
    """Bytes of .text / .rodata / .data / .bss that object ``obj`` contributes (link map)."""
    sizes = {"text": 0, "rodata": 0, "data": 0, "bss": 0}
    body = text.split("Linker script and memory map", 1)[-1]
    pending = None
    line_re = re.compile(r"^ (\.\S+|COMMON)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+)$")
    for line in body.splitlines():
        alone = re.match(r"^ (\.\S+|COMMON)$", line)
        if alone:
            pending = alone.group(1)
            continue
        m = line_re.match(line)
        if m is None:
            pending = None
            continue
        name = m.group(1) or pending
        pending = None
        if name is None or not m.group(4).endswith(obj):
            continue
        size = int(m.group(3), 16)
        for key in ("text", "rodata", "data", "bss"):
            if name.startswith(f".{key}") or (key == "bss" and name == "COMMON"):
                sizes[key] += size
                break
    return sizes


class Firmware(ScratchDir):
    """``model.c`` linked into test firmware for ``core`` in a temporary directory."""

    def __init__(self, sources: dict[str, str], core: str, opt: str = "-Os") -> None:
        cc = toolchain()
        if cc is None:
            raise ExportError(f"cannot build for {core}: {missing()}")
        self.core = core_of(core)
        self.opt = opt
        super().__init__(prefix="edgeslim-arm-")
        for name, text in sources.items():
            (self.dir / name).write_text(text, encoding="utf-8")
        for name in ("arm_harness.c", "arm_startup.c", "arm.ld"):
            (self.dir / name).write_text(template(name), encoding="utf-8")
        flags = [*self.core.flags, opt, *CFLAGS]
        objects = []
        for src in ("model.c", "arm_harness.c", "arm_startup.c"):
            obj = src.replace(".c", ".o")
            self._cc([cc, *flags, "-c", src, "-o", obj])
            objects.append(obj)
        link = [cc, *self.core.flags, opt, "-nostartfiles", "--specs=nano.specs"]
        link += ["-Wl,--gc-sections", "-Wl,-Map=firmware.map", "-T", "arm.ld"]
        self._cc([*link, "-o", "firmware.elf", *objects])
        self.elf = self.dir / "firmware.elf"
        map_text = (self.dir / "firmware.map").read_text(encoding="utf-8", errors="replace")
        self.model_sizes = _map_sizes(map_text, "model.o")
        self.image_sizes = self._size()

    def _cc(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportError(f"the ARM build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")

    def _size(self) -> dict[str, int]:
        size = shutil.which("arm-none-eabi-size")
        if size is None:
            return {}
        proc = subprocess.run([size, "firmware.elf"], cwd=self.dir, capture_output=True, text=True)
        rows = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or len(rows) < 2:
            return {}
        text, data, bss = (int(v) for v in rows[1].split()[:3])
        return {"text": text, "data": data, "bss": bss}

    def run(self, q, output_size: int, timeout: float = 600) -> QemuRun:
        """Run the inputs ``q`` (N, ...) int8 on the emulated board (a model with several
        inputs: a tuple of batches; ``output_size``: all its outputs of one inference)."""
        emulator = qemu()
        if emulator is None:
            raise ExportError(f"cannot run on QEMU: {missing()}")
        q = np.ascontiguousarray(reference.pack(q), dtype=np.int8)
        (self.dir / "in.bin").write_bytes(q.tobytes())
        for name in ("out.bin", "stats.bin"):
            (self.dir / name).unlink(missing_ok=True)
        cmd = [
            emulator,
            "-machine",
            self.core.machine,
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
            "-icount",
            "shift=0",
            "-kernel",
            "firmware.elf",
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise ExportError(
                f"QEMU ({self.core.machine}) did not finish within {timeout:g} s"
            ) from exc
        if proc.returncode != 0:
            raise ExportError(
                f"the firmware failed on QEMU {self.core.machine} (exit {proc.returncode}; "
                f"3 = a fault, 2 = no semihosting files):\n{proc.stderr[-2000:]}"
            )
        out = np.frombuffer((self.dir / "out.bin").read_bytes(), np.int8).astype(np.int64)
        if out.size != len(q) * output_size:
            raise ExportError(
                f"QEMU wrote {out.size} output bytes for {len(q)} inputs, expected "
                f"{len(q) * output_size}"
            )
        stats = np.frombuffer((self.dir / "stats.bin").read_bytes(), np.int32).reshape(-1, 2)
        calib_ticks, loops = int(stats[0, 0]), int(stats[0, 1])
        per_tick = CALIB_INSTRUCTIONS_PER_LOOP * loops / max(calib_ticks, 1)
        return QemuRun(
            out.reshape(len(q), output_size),
            [round(int(t) * per_tick) for t in stats[1:, 0]],
            [int(s) for s in stats[1:, 1]],
            per_tick,
        )


def build(
    graph: ir.Graph,
    sources: dict[str, str],
    core: str,
    q=None,
    *,
    opt: str = "-Os",
) -> ArmBuild:
    """Build ``sources`` for ``core``; with inputs ``q`` (and QEMU installed) also run them
    and require the reference interpreter's outputs (every output) bit for bit. ``q``: an
    int8 batch, or a tuple of batches for a graph with several inputs."""
    io = graph.io_bytes()
    with Firmware(sources, core, opt) as fw:
        result = ArmBuild(fw.core.name, fw.core.machine, opt, fw.model_sizes, fw.image_sizes, io)
        if q is not None and qemu() is not None:
            run = fw.run(q, reference.output_size(graph))
            expected = reference.run_batch(graph, q).reshape(run.outputs.shape)
            if not np.array_equal(run.outputs, expected):
                bad = int(np.sum(run.outputs != expected))
                raise ExportError(
                    f"on QEMU {fw.core.machine} the {fw.core.name} build differs from the "
                    f"reference interpreter in {bad} of {expected.size} output values"
                )
            result.run = run
            result.verified.append(
                f"{fw.core.name} build ({opt}) bit-exact on QEMU {fw.core.machine}, "
                f"{reference.batch_size(q)} inputs"
            )
    return result


def build_for_device(
    graph: ir.Graph,
    sources: dict[str, str],
    device,
    q: np.ndarray | None,
    *,
    required: bool = False,
    opt: str = "-Os",
) -> ArmBuild | None:
    """:func:`build` for ``device``'s core when it is a Cortex-M this module knows and the
    toolchain is installed; None otherwise, unless ``required`` (then :class:`ExportError`)."""
    if device.core.lower() not in CORES or toolchain() is None:
        if required:
            why = missing() if toolchain() is None else f"core {device.core} is not supported"
            raise ExportError(f"no ARM build for {device.name}: {why}")
        return None
    return build(graph, sources, device.core, q, opt=opt)
