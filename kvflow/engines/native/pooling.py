"""Embeddings from final hidden states: last-token or mean pooling over a prompt's prefill chunks.

A prompt may be prefilled in several chunks (steps); `Pooler.add` takes each chunk's
hidden rows and, on the last chunk, returns the embedding (on the device): the last
token's state or the mean over all prompt tokens, cut to `dimensions` (leading
components, as Matryoshka-trained models expect) and L2-normalized when asked.
"""

from __future__ import annotations

import torch

from kvflow.llm.protocol import EmbedOptions

POOLINGS = ("last", "mean")


class Pooler:
    """Running sums of the embedding requests whose prefill is under way, by request id."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, request_id: str, rows: torch.Tensor, opts: EmbedOptions, final: bool
            ) -> torch.Tensor | None:
        if opts.pooling == "mean":
            total = rows.float().sum(dim=0)
            if request_id in self._sums:
                total = total + self._sums.pop(request_id)
            count = self._counts.pop(request_id, 0) + rows.shape[0]
            if not final:
                self._sums[request_id], self._counts[request_id] = total, count
                return None
            vector = total / count
        else:
            if not final:
                return None
            vector = rows[-1].float()
        return finish(vector, opts)

    def forget(self, request_id: str) -> None:
        self._sums.pop(request_id, None)
        self._counts.pop(request_id, None)


def finish(vector: torch.Tensor, opts: EmbedOptions) -> torch.Tensor:
    if opts.dimensions is not None:
        vector = vector[: opts.dimensions]
    if opts.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector
