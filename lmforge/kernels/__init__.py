"""Native kernels, built on the machine that runs them (``native.c``). For decoding: the products
of weights kept in blocks (:class:`lmforge.quant.BlockLinear`), one row times a float32 or
bfloat16 weight stored transposed (:class:`lmforge.quant.DecodeLinear`), RMSNorm in one call
(:class:`lmforge.quant.DecodeRMSNorm`), and the attention of each sequence's new token over its key/value
cache (:class:`lmforge.model.attention.SelfAttention` decoding a token per sequence), and a whole
pre-norm block's step for one new token (:mod:`lmforge.kernels.step`); and, for training, GELU's
tanh and erf forms forward and backward, float32 or bfloat16 (:mod:`lmforge.kernels.activation`) and causal self-attention from
the fused Q/K/V projection forward and backward (:mod:`lmforge.kernels.causal`), in bfloat16 on
AMX tiles where the CPU has them (:func:`amx_tiles`).

The C source is compiled once with the system's C compiler (``$CC``, else ``cc``) and
``-march=native``, into ``$LMFORGE_CACHE`` (default ``~/.cache/lmforge``)``/kernels/``, under a
name that hashes the source, the compiler and the CPU, so a change of any of them builds anew;
later processes load the built library (a fraction of a second). Called through ``ctypes`` with
the tensors' memory: CPU, contiguous, the dtypes stated. Where no compiler or no AVX2/FMA/F16C is there,
:func:`block_kernels` is None and :func:`kernel_problem` says why; callers then keep float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "amx_tiles",
    "block_dequantize",
    "block_find",
    "block_kernels",
    "block_matmul",
    "block_matmul_op",
    "check_blocks",
    "decode_attention",
    "dense_row",
    "kernel_problem",
    "rms_norm",
]

SOURCE = Path(__file__).with_name("native.c")
BLOCK = 32  # columns per block (native.c)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"]
COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), for the build's name: a library built for one CPU is
    never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compile(compiler: str, library: Path) -> str | None:
    """Build ``native.c`` into ``library``; None, or why it failed."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        built = Path(work) / library.name
        try:
            done = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"building {SOURCE.name} failed ({err})"
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
            return f"building {SOURCE.name} failed: {first.strip()[:200]}"
        os.replace(built, library)  # atomic: a process loading it sees all of it or none
    return None


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """The built library (building it if needed), or None and the reason."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install cc)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"the C compiler {compiler} does not run ({err})"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()])
    )
    library = cache_dir() / f"native-{platform.machine()}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        try:
            problem = _compile(compiler, library)
        except OSError as err:  # the cache folder cannot be written
            problem = f"building {SOURCE.name} into {library.parent} failed ({err})"
        if problem is not None:
            return None, problem
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as err:
        return None, f"loading {library} failed ({err})"
    pointer, size, integer = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.block_matmul.argtypes = [
        pointer,
        size,
        size,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        size,
        ctypes.c_int,
    ]
    lib.block_matmul.restype = ctypes.c_int
    lib.block_dequantize.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_int]
    lib.block_dequantize.restype = None
    lib.rms_norm.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_float]
    lib.rms_norm.restype = None
    lib.dense_row.argtypes = [pointer, size, pointer, size, pointer, pointer, size, ctypes.c_int]
    lib.dense_row.restype = None
    lib.dense_row_bf16.argtypes = lib.dense_row.argtypes
    lib.dense_row_bf16.restype = None
    lib.decode_attention.argtypes = [
        pointer,  # qkv
        size,  # B
        size,  # H
        size,  # Hkv
        size,  # D
        pointer,  # cos
        pointer,  # sin
        size,  # R
        size,  # rope stride
        pointer,  # keys
        pointer,  # values
        size,  # capacity
        pointer,  # positions
        size,  # position
        ctypes.c_float,
        pointer,  # out
        integer,  # threads
    ]
    lib.decode_attention.restype = integer
    lib.block_find.argtypes = [pointer, size, size, integer, integer, pointer, pointer, pointer]
    lib.block_find.restype = integer
    lib.decode_block.argtypes = [
        pointer,  # the block's weights (step.py)
        pointer,  # x
        pointer,  # y
        pointer,  # cos
        pointer,  # sin
        size,  # R
        pointer,  # keys
        pointer,  # values
        size,  # capacity
        size,  # position
        integer,  # threads
    ]
    lib.decode_block.restype = integer
    lib.gelu_tanh_forward.argtypes = [pointer, pointer, size, integer]
    lib.gelu_tanh_forward.restype = None
    lib.gelu_tanh_backward.argtypes = [pointer, pointer, pointer, size, integer]
    lib.gelu_tanh_backward.restype = None
    lib.gelu_erf_forward.argtypes = [pointer, pointer, size, integer]
    lib.gelu_erf_forward.restype = None
    lib.gelu_erf_backward.argtypes = [pointer, pointer, pointer, size, integer]
    lib.gelu_erf_backward.restype = None
    lib.gelu_bf16_forward.argtypes = [pointer, pointer, size, integer, integer]  # x, y, n, tanh form, threads
    lib.gelu_bf16_forward.restype = None
    lib.gelu_bf16_backward.argtypes = [pointer, pointer, pointer, size, integer, integer]
    lib.gelu_bf16_backward.restype = None
    # x, h, h_half, hb, w, b, sum, y, y_half, mean, rstd, rows, dim, eps, threads
    lib.layer_norm_forward.argtypes = [
        pointer, pointer, integer, pointer, pointer, pointer, pointer, pointer, integer, pointer, pointer, size,
        size, ctypes.c_float, integer,
    ]  # fmt: skip
    lib.layer_norm_forward.restype = None
    # dy, dy_half, ds, s, w, mean, rstd, dx, dh, dw, db, dhb, rows, dim, threads
    lib.layer_norm_backward.argtypes = [pointer, integer, *[pointer] * 10, size, size, integer]
    lib.layer_norm_backward.restype = integer
    lib.gelu_tables.argtypes = []
    lib.gelu_tables.restype = None
    lib.gelu_tables()  # the bfloat16 passes' lookup tables (AVX-512), filled once before any pass
    real = ctypes.c_float
    shape = [size] * 5  # B, T, H, Hkv, D
    angles = [pointer, pointer, size, size]  # cos, sin, R, the stride between sequences' tables
    # qkv, shape, scale, angles, out, lse, threads
    lib.causal_attention_forward.argtypes = [pointer, *shape, real, *angles, pointer, pointer, integer]
    lib.causal_attention_forward.restype = integer
    # qkv, out, dout, lse, shape, scale, angles, dqkv, threads
    lib.causal_attention_backward.argtypes = [*[pointer] * 4, *shape, real, *angles, pointer, integer]
    lib.causal_attention_backward.restype = integer
    lib.amx_ready.argtypes = []
    lib.amx_ready.restype = integer
    if hasattr(lib, "causal_attention_forward_bf16"):  # the same in bfloat16 on AMX tiles (section 8)
        lib.transpose_bf16.argtypes = [pointer, size, size, pointer, integer]
        lib.transpose_bf16.restype = None
        lib.causal_attention_forward_bf16.argtypes = lib.causal_attention_forward.argtypes
        lib.causal_attention_forward_bf16.restype = integer
        lib.causal_attention_backward_bf16.argtypes = lib.causal_attention_backward.argtypes
        lib.causal_attention_backward_bf16.restype = integer
    return lib, None


@cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("LMFORGE_NO_KERNELS"):
        return None, "LMFORGE_NO_KERNELS is set"
    return _build()


def block_kernels() -> ctypes.CDLL | None:
    """The native kernels of this machine (``native.c`` built), or None (:func:`kernel_problem` says why)."""
    return _library()[0]


@cache
def amx_tiles() -> bool:
    """Whether the kernels' bfloat16 paths for AMX CPUs (Intel's matrix tiles) run here: the
    kernels built for a CPU with AMX-BF16, the operating system's leave to use the tiles granted,
    and ``LMFORGE_NO_AMX`` unset (it turns those paths off, for comparisons)."""
    lib = block_kernels()
    return lib is not None and not os.environ.get("LMFORGE_NO_AMX") and lib.amx_ready() == 1


def kernel_problem() -> str | None:
    """Why the native kernels are unavailable here, or None when they are available."""
    return _library()[1]


def _pointer(tensor: Tensor | None, dtype: torch.dtype) -> int | None:
    """``tensor``'s memory for C (None for None), once it is checked to be what C will read."""
    if tensor is None:
        return None
    if tensor.dtype is not dtype or not tensor.is_cpu or not tensor.is_contiguous():
        raise ValueError(
            f"expected a contiguous CPU tensor of {dtype}, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    return tensor.data_ptr()


def check_blocks(codes: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None) -> None:
    """That a block weight is what the kernels read: codes (N, K) int8, K a multiple of 32,
    scales and offsets (N, K / 32) float32, bias (N,) float32, all contiguous on the CPU.

    Raises:
        ValueError: what is not so.
    """
    N, K = codes.shape
    blocks = (N, K // BLOCK)
    if K % BLOCK or scales.shape != blocks or (offsets is not None and offsets.shape != blocks):
        raise ValueError(
            f"codes {tuple(codes.shape)} need K a multiple of {BLOCK} and scales/offsets {blocks}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias {tuple(bias.shape)} does not match {N} rows")
    for tensor, dtype in (
        (codes, torch.int8),
        (scales, torch.float32),
        (offsets, torch.float32),
        (bias, torch.float32),
    ):
        _pointer(tensor, dtype)  # raises for a dtype, device or layout C cannot read


def block_matmul(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    offsets: Tensor | None,
    bias: Tensor | None,
    *,
    checked: bool = False,
) -> Tensor:
    """x (M, K) times the block weight's transpose: (M, N), float32 (``native.c`` says the
    layout; :func:`check_blocks` the tensors it takes). ``checked=True``: the caller has checked
    the weight's tensors already (:class:`~lmforge.quant.BlockLinear` does once: a one-token step
    calls this for every layer, and the checks cost as much as a small product).

    Raises:
        ValueError: a tensor of another dtype, device, layout or shape.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    if not checked:
        check_blocks(codes, scales, offsets, bias)
    (M, K), N = x.shape, codes.shape[0]
    if codes.shape[1] != K:
        raise ValueError(f"x has {K} columns but the weight {codes.shape[1]}")
    y = torch.empty(M, N, dtype=torch.float32)  # whatever the default dtype: C writes float32
    status = lib.block_matmul(
        _pointer(x, torch.float32), M, K, codes.data_ptr(), scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(), None if bias is None else bias.data_ptr(),
        y.data_ptr(), N, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("block_matmul: out of memory")
    return y


def block_dequantize(codes: Tensor, scales: Tensor, offsets: Tensor | None) -> Tensor:
    """The block weight as a float32 (N, K) tensor: scale · code (+ offset), each one rounding.

    Raises:
        ValueError: as :func:`block_matmul`.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    check_blocks(codes, scales, offsets, None)
    N, K = codes.shape
    w = torch.empty(N, K, dtype=torch.float32)
    lib.block_dequantize(
        _pointer(codes, torch.int8), _pointer(scales, torch.float32), _pointer(offsets, torch.float32),
        w.data_ptr(), N, K, torch.get_num_threads(),
    )  # fmt: skip
    return w


def block_find(weight: Tensor, span: int, offset: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Codes, scales and offsets of ``weight`` (N, K), float32, when every block of 32 columns
    lies exactly on the grid of ``span`` (see ``block_find`` in ``native.c``); else None. One
    pass, stopping at the first weight off the grid.

    Raises:
        ValueError: a weight of another dtype, device or layout, or K no multiple of 32.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    N, K = weight.shape
    if K % BLOCK:
        raise ValueError(f"{K} columns are no whole number of blocks of {BLOCK}")
    codes = torch.empty(N, K, dtype=torch.int8)
    scales = torch.empty(N, K // BLOCK, dtype=torch.float32)
    offsets = torch.empty(N, K // BLOCK, dtype=torch.float32) if offset else None
    found = lib.block_find(
        _pointer(weight, torch.float32), N, K, span, int(offset), codes.data_ptr(), scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(),
    )  # fmt: skip
    return (codes, scales, offsets) if found else None


@torch.library.custom_op("lmforge::block_matmul", mutates_args=())
def block_matmul_op(
    x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None
) -> Tensor:
    """:func:`block_matmul` as a PyTorch operator, which ``torch.compile`` keeps in its graph (a
    plain call would break the graph at every layer). Dispatching costs more than the plain call
    (about 30 against 9 µs here), so eager code calls :func:`block_matmul`."""
    return block_matmul(x, codes, scales, offsets, bias)  # every tensor checked: nothing checked them before


@block_matmul_op.register_fake
def _(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row of ``x`` (…, dim) times ``weight`` (dim,), float32: one call (PyTorch's
    ``F.rms_norm`` runs six small operators on a CPU, which a one-token step pays 61 times).

    Raises:
        ValueError: a tensor of another dtype, device or layout, or a weight of another width.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows of {dim}")
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.rms_norm(
        _pointer(x, torch.float32), _pointer(weight, torch.float32), y.data_ptr(), x.numel() // dim, dim, eps
    )
    return y


def dense_row(x: Tensor, weight_t: Tensor, bias: Tensor | None, *, checked: bool = False) -> Tensor:
    """One row ``x`` (K,) times a float32 or bfloat16 weight stored transposed, ``weight_t``
    (K, N) (its rows may lie apart: a view of some columns of a wider weight), plus ``bias``
    (N,): (N,), float32 (a bfloat16 weight widened as it is read: half the bytes, the same
    arithmetic). Eight rows of the weight are streamed at a time (``native.c``): a one-row
    product is bound by reading the weight, and this reads it faster than the BLAS's one-row
    kernel here.
    ``checked=True``: the caller has checked the tensors (:class:`~lmforge.quant.DecodeLinear`
    does, in a few attribute reads: its product is called 48 times a GPT-2 token).

    Raises:
        ValueError: a tensor of another dtype, device, layout or shape.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    K, N = weight_t.shape
    if not checked:
        if x.shape != (K,):
            raise ValueError(f"x {tuple(x.shape)} is not one row of the weight's {K} columns")
        if weight_t.dtype not in (torch.float32, torch.bfloat16) or not weight_t.is_cpu or weight_t.stride(1) != 1:
            raise ValueError("the weight must be float32 or bfloat16 on the CPU, its rows contiguous")
        if bias is not None and bias.shape != (N,):
            raise ValueError(f"bias {tuple(bias.shape)} does not match the weight's {N} outputs")
        _pointer(x, torch.float32)
        _pointer(bias, torch.float32)
    y = torch.empty(N, dtype=torch.float32)
    product = lib.dense_row_bf16 if weight_t.dtype is torch.bfloat16 else lib.dense_row
    product(
        x.data_ptr(), K, weight_t.data_ptr(), weight_t.stride(0), None if bias is None else bias.data_ptr(),
        y.data_ptr(), N, torch.get_num_threads(),
    )  # fmt: skip
    return y


def decode_attention(
    qkv: Tensor,
    rope: tuple[Tensor, Tensor] | None,
    keys: Tensor,
    values: Tensor,
    positions: int | Tensor,
    heads: int,
    scale: float,
) -> Tensor:
    """Self-attention of one new token of each of B sequences over their key/value caches, in
    one call (``native.c``): row b of ``qkv`` (B, (H + 2·Hkv)·D) is its token's fused projection
    [q | k | v], rotated in place by ``rope``'s cos/sin ((R,) for every row, or (B, R); R ≤ D;
    None: no rotation); its k and v are written into ``keys``/``values`` (B, Hkv, capacity, D) at
    the row's position (``positions``: one int for every row, or (B,) int64), and each query head
    attends to positions 0..that of its key/value head (GQA: H / Hkv query heads share one).
    Returns the heads' outputs side by side, (B, H·D), float32.

    Raises:
        ValueError: tensors of another dtype, device, layout or shape, D no multiple of 8, or a
            position outside the cache.
    """
    lib = block_kernels()
    assert lib is not None, kernel_problem()
    rows, kv_heads, capacity, head_dim = keys.shape
    if values.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    if head_dim % 8 or heads % kv_heads or qkv.shape != (rows, (heads + 2 * kv_heads) * head_dim):
        raise ValueError(
            f"qkv {tuple(qkv.shape)} for {rows} rows of {heads} heads, {kv_heads} key/value heads of width {head_dim}"
        )
    if isinstance(positions, int):
        low = high = positions
        position, table = positions, None
    else:
        if positions.shape != (rows,):
            raise ValueError(f"positions {tuple(positions.shape)} for {rows} rows")
        low, high = int(positions.min()), int(positions.max())
        position, table = 0, _pointer(positions, torch.int64)
    if not 0 <= low <= high < capacity:
        raise ValueError(f"positions {low}..{high} are outside a cache of {capacity}")
    cos = sin = None
    angles = stride = 0
    if rope is not None:
        cos, sin = rope
        angles = cos.shape[-1]
        if (
            cos.shape != sin.shape
            or angles > head_dim
            or angles % 2
            or cos.numel() not in (angles, rows * angles)
        ):
            raise ValueError(
                f"rotary angles {tuple(cos.shape)} and {tuple(sin.shape)} for {rows} rows of heads of {head_dim}"
            )
        stride = 0 if cos.numel() == angles else angles
    out = torch.empty(rows, heads * head_dim, dtype=torch.float32)
    status = lib.decode_attention(
        _pointer(qkv, torch.float32), rows, heads, kv_heads, head_dim, _pointer(cos, torch.float32),
        _pointer(sin, torch.float32), angles, stride, _pointer(keys, torch.float32),
        _pointer(values, torch.float32), capacity, table, position, scale, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("decode_attention: out of memory")
    return out

