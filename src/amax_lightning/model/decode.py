"""Nearest-token decoding by cosine similarity, and the activation of the decoded tokens."""

from __future__ import annotations

import contextlib
import os
import platform
import time

import torch
import torch.nn.functional as F

from amax_lightning.base.errors import UserError


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, vocab: torch.Tensor, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each vector to the vocabulary row of highest cosine similarity.

    Parameters
    ----------
    vectors
        Vectors to decode, shape (..., d_model).
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model).
    chunk_rows
        Vectors compared at once; bounds the (chunk_rows, V) similarity matrix held in memory.

    Returns
    -------
    token_ids, cosine
        Both of shape ``vectors.shape[:-1]``: the argmax token id (lowest id on ties) and its cosine in [-1, 1].
    """
    ids, cosines = [], []
    for scores in _cosine_chunks(vectors, vocab, chunk_rows):
        best = scores.max(dim=-1)
        ids.append(best.indices)
        cosines.append(best.values)
    shape = vectors.shape[:-1]
    return torch.cat(ids).view(shape), torch.cat(cosines).clamp(-1.0, 1.0).view(shape)


@torch.no_grad()
def nearest_tokens_with_neighbours(vectors: torch.Tensor, vocab: torch.Tensor, k: int = 5, chunk_rows: int = 1024
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nearest_tokens`` and, from the same similarities, the ``k`` nearest tokens of each vector, best first.

    Returns ``token_ids``, ``cosine`` (shape ``vectors.shape[:-1]``, as ``nearest_tokens``) and ``top_ids``,
    ``top_cosine`` (shape ``vectors.shape[:-1] + (k,)``, k at most V).
    """
    k = min(k, vocab.shape[0])
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for scores in _cosine_chunks(vectors, vocab, chunk_rows):
        best, top = scores.max(dim=-1), scores.topk(k, dim=-1)
        for part, tensor in zip(parts, (best.indices, best.values, top.indices, top.values)):
            part.append(tensor)
    shape = vectors.shape[:-1]
    ids, cosine, top_ids, top_cosine = (torch.cat(part) for part in parts)
    return (ids.view(shape), cosine.clamp(-1.0, 1.0).view(shape), top_ids.view(*shape, k),
            top_cosine.clamp(-1.0, 1.0).view(*shape, k))


def _cosine_chunks(vectors: torch.Tensor, vocab: torch.Tensor, chunk_rows: int):
    """Cosine similarities of the flattened vectors with every vocabulary row, (chunk_rows, V) at a time, fp32."""
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    unit_vocab = F.normalize(vocab.float(), dim=-1)
    for chunk in flat.split(chunk_rows):
        yield chunk @ unit_vocab.T


# |bf16 score - exact score| for unit vectors: operands rounded to bf16 (2 * 2^-8 + 2^-16), the fp32 accumulation
# over d <= 16384 terms (< 2^-10), the result rounded to bf16 (2^-8 of |score| <= 1): 0.01271 in all, so 0.013.
# It needs fp32 accumulation: on CUDA the bf16 reduced-precision reduction is switched off for the matmul.
BF16_SCORE_ERROR = 0.013


def fp32_score_error(d: int) -> float:
    """A bound on |fp32 score - exact score| for unit vectors of width ``d``: the dot product's rounding
    (``d * 2^-24`` of sum |a_i b_i| <= 1) plus the normalizations' (a few ``2^-24``), doubled for safety."""
    return 2 * (d + 4) * 2.0**-24


DECODE_ENV = "AMAX_LIGHTNING_DECODE"  # bf16 | fp32 | auto: which first pass CheckedNearestTokens uses
PATHS = ("fp32", "bf16")
PROBE_BLOCKS = 3  # full blocks timed per path when choosing (the first of each warms up)
BF16_MUST_WIN = 0.9  # bf16 is chosen only below this fraction of the fp32 time


def requested_path(path: str | None = None) -> str:
    """``path``, else ``$AMAX_LIGHTNING_DECODE``, else ``auto``; one of ``auto``, ``bf16``, ``fp32``."""
    value = path or os.environ.get(DECODE_ENV) or "auto"
    if value not in ("auto", *PATHS):
        raise UserError(f"{DECODE_ENV} {value!r} is not one of auto, bf16, fp32")
    return value


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether PyTorch has bf16 matmul kernels for ``device`` (else it emulates them, about 4x slower than fp32).

    CUDA: compute capability 8.0 or newer. CPU: oneDNN's bf16 check (x86 with AVX-512, AArch64 with BF16);
    having them does not make bf16 faster (AVX-512 BF16 without AMX: slower than fp32), so the path is timed.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def _cpu_flag(name: str) -> bool | None:
    check = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(check()) if check is not None else None


def device_kind(device: torch.device | str = "cpu") -> dict:
    """What decides the decode path on ``device``: its name, PyTorch's CPU capability string (``AVX512``, ``AVX2``,
    ...), whether it has AVX-512 BF16 and AMX (bf16 matrix units), oneDNN/CUDA bf16 kernels, and torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as info:
                name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    return {"device": device.type, "name": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": _cpu_flag("avx512_bf16"), "amx": _cpu_flag("amx_tile"),
            "native_bf16_matmul": native_bf16_matmul(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


@contextlib.contextmanager
def _exact_matmuls():
    """fp32 matmuls in full fp32 (no TF32 or bf16 passes), and bf16 products summed in fp32 (the bounds above)."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = previous[1]


class CheckedNearestTokens:
    """The nearest token ids by cosine, as ``nearest_tokens`` finds them: a fast first pass, checked exactly.

    A first pass scores every token with one matmul, in bf16 or fp32 (``path``); per vector, every token within
    twice that pass's error bound of its best score is kept (the true argmax always is), and exact fp32 dot
    products of those candidates decide, ties to the lowest id. The candidates' exact scores are the same numbers
    whichever pass found them, so both paths give the same ids. bf16 keeps about 30 candidates per vector on
    GPT-2 small, fp32 about 1. Which pass is faster depends on the machine: bf16 was about 4x faster than fp32 on
    a Xeon with AMX, 1.7x slower on one with AVX-512 BF16 only, and 4x slower on AMD Zen 3 (no bf16 kernels).
    ``path="auto"`` (or ``None``, which reads ``$AMAX_LIGHTNING_DECODE``) uses fp32 where PyTorch has no bf16
    kernels, else times ``PROBE_BLOCKS`` full blocks of each (alternating; every block's ids are kept) and keeps
    the faster; ``verdict`` then says which and the seconds per block. Vectors are decoded ``block_rows`` at a time
    into work buffers allocated once (no large temporary page-faulted in again per block).

    Parameters
    ----------
    vocab
        Input-embedding rows of the vocabulary, shape (V, d_model), any float dtype.
    block_rows
        Vectors decoded at once (count, >= 1).
    path
        ``bf16``, ``fp32``, ``auto``, or None (``$AMAX_LIGHTNING_DECODE``, default ``auto``).
    """

    def __init__(self, vocab: torch.Tensor, block_rows: int = 256, path: str | None = None) -> None:
        self.unit_vocab = F.normalize(vocab.detach().float(), dim=-1)
        n_tokens, d = vocab.shape
        self.block_rows = block_rows
        path = requested_path(path)
        if path == "auto" and not native_bf16_matmul(vocab.device):
            path = "fp32"
        self.path = None if path == "auto" else path  # None while timing both
        self.verdict: dict | None = None
        self._times: dict[str, list[float]] = {name: [] for name in PATHS}
        self._first_pass = {name: self._first_pass_buffers(name) for name in (PATHS if self.path is None else (path,))}
        self._kept = torch.empty(block_rows, n_tokens, dtype=torch.bool, device=vocab.device)
        # gathered candidates (about 30 per vector in bf16 on GPT-2 small); grown when a block needs more
        self._pairs = torch.empty(2, block_rows * 32, d, dtype=torch.float32, device=vocab.device)

    def _first_pass_buffers(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        scores = torch.empty(self.block_rows, self.unit_vocab.shape[0], dtype=dtype, device=self.unit_vocab.device)
        return self.unit_vocab.to(dtype), scores

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Token ids, shape (n,), of the vectors (n, d_model) (any scale: decoding is by cosine)."""
        unit = F.normalize(vectors.float(), dim=-1)
        return torch.cat([self._timed_block(block) for block in unit.split(self.block_rows)])

    def _timed_block(self, unit: torch.Tensor) -> torch.Tensor:
        if self.path is not None:
            return self._block(unit, self.path)
        name = min(PATHS, key=lambda p: len(self._times[p]))  # alternate, fp32 first
        started = _now(unit.device)
        ids = self._block(unit, name)
        if unit.shape[0] == self.block_rows:  # only full blocks are compared
            self._times[name].append(_now(unit.device) - started)
            if all(len(times) >= PROBE_BLOCKS for times in self._times.values()):
                self._choose()
        return ids

    def _choose(self) -> None:
        seconds = {name: min(times[1:]) for name, times in self._times.items()}  # the first of each warms up
        self.path = "bf16" if seconds["bf16"] < BF16_MUST_WIN * seconds["fp32"] else "fp32"
        self.verdict = {"path": self.path, "block_rows": self.block_rows,
                        **{f"{name}_seconds_per_block": value for name, value in seconds.items()}}
        self._first_pass = {self.path: self._first_pass[self.path]}  # the other pass's buffers are freed

    def _block(self, unit: torch.Tensor, name: str) -> torch.Tensor:
        n, n_tokens = unit.shape[0], self.unit_vocab.shape[0]
        approx_vocab, scores = self._first_pass[name]
        approx, kept = scores[:n], self._kept[:n]
        with _exact_matmuls():
            torch.matmul(unit.to(approx_vocab.dtype), approx_vocab.T, out=approx)  # (n, V)
        if name == "bf16":
            # the threshold, rounded to bf16, may rise by 2^-8 of |threshold| <= 1.05: lowered by 0.005 to stay safe
            threshold = (approx.amax(dim=-1, keepdim=True).float() - 2 * BF16_SCORE_ERROR - 0.005).to(torch.bfloat16)
        else:
            threshold = approx.amax(dim=-1, keepdim=True) - 2 * fp32_score_error(unit.shape[1])
        torch.ge(approx, threshold, out=kept)
        rows, cols = kept.nonzero(as_tuple=True)
        m = rows.numel()
        if m > self._pairs.shape[1]:
            self._pairs = self._pairs.new_empty(2, 2 * m, unit.shape[1])
        vectors = torch.index_select(unit, 0, rows, out=self._pairs[0, :m])
        tokens = torch.index_select(self.unit_vocab, 0, cols, out=self._pairs[1, :m])
        exact = vectors.mul_(tokens).sum(dim=-1)  # fp32 products and sum: no matmul, so no TF32 whatever the setting
        row_best = torch.full((n,), -torch.inf, device=exact.device).scatter_reduce(0, rows, exact, "amax")
        winners = exact == row_best[rows]
        ids = torch.full((n,), n_tokens, dtype=torch.long, device=exact.device)
        return ids.scatter_reduce(0, rows[winners], cols[winners], "amin")


def _now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
