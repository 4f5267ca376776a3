"""Random numbers for tensor parallelism: per-module init generators and the dropout RNG tracker.

Initialisation. Every module draws its weights from its own `torch.Generator`, seeded from the
run seed and the module's name (`init_generator(seed, "block.3")`). A tensor-parallel layer
draws the FULL unsharded weight on the CPU and keeps its slice, so a TP=N shard is exactly the
slice of the TP=1 weight, and building one pipeline stage alone gives the weights it has in the
whole model. (Cost: one full weight matrix of temporary CPU memory per layer at construction.)

Dropout (Megatron's RNG tracker idea). Outside tensor-parallel regions the activations are
replicated on the tensor ranks and dropout must draw the same mask on each: it uses the default
generator, seeded identically on the tensor ranks by the trainer. Inside a region (attention
heads split across ranks, or sequence shards under sequence parallelism) each rank must draw an
independent mask: `with rng.fork():` swaps in a generator seeded with seed + 2718 + tensor_rank
and swaps the default back afterwards. The tracker is an object held by the model, never a
module global.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch

TENSOR_PARALLEL_SEED_OFFSET = 2718
"""Megatron's offset between the data-parallel and the tensor-model-parallel seeds."""


def init_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, name), stable across processes, runs and machines."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


InitMethod = Callable[[torch.Tensor], None]
"""Fills a FULL (unsharded) CPU weight in place; parallel layers slice it afterwards."""


def normal_init(std: float, generator: torch.Generator, rows: int | None = None) -> InitMethod:
    """N(0, std^2) from `generator`; with `rows`, only the first rows are drawn and the rest
    (vocabulary padding) are zero, so the real rows do not depend on the padded size."""

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight.zero_()
            n = weight.size(0) if rows is None else rows
            draw = torch.empty((n, *weight.shape[1:]), dtype=torch.float32)
            draw.normal_(0.0, std, generator=generator)
            weight[:n].copy_(draw)

    return init


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TensorParallelRNG:
    """Dropout RNG for tensor-parallel regions: `with rng.fork(): F.dropout(...)`.

    Inside `fork()` the default generator of `device` runs from this tracker's own state, seeded
    with seed + 2718 + tensor_rank (different on each tensor rank, equal across data-parallel
    replicas); outside it the default generator is untouched. `get_states`/`set_states` save and
    restore the tracker (for checkpoints and activation recomputation).
    """

    def __init__(self, seed: int, tensor_rank: int, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else _default_device()
        self.tensor_rank = tensor_rank
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the stream from seed + 2718 + tensor_rank."""
        self.seed = seed + TENSOR_PARALLEL_SEED_OFFSET + self.tensor_rank
        self._state = torch.Generator(device=self.device).manual_seed(self.seed).get_state()

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Run the block with the tensor-parallel generator state; restore the default after."""
        saved = _get_state(self.device)
        _set_state(self._state, self.device)
        try:
            yield
        finally:
            self._state = _get_state(self.device)
            _set_state(saved, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {"tensor_parallel": self._state.clone()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._state = states["tensor_parallel"].clone()


def maybe_fork(rng: TensorParallelRNG | None) -> contextlib.AbstractContextManager:
    """`rng.fork()`, or a no-op when there is no tracker (no tensor parallelism)."""
    return rng.fork() if rng is not None else contextlib.nullcontext()
