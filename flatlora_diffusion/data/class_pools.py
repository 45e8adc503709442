"""Prior preservation over several subsets: one class stream per class pool.

Each instance sample is paired with a class image of its own subset's pool (drawn as
`stream.draw_like` does for one pool); subsets without a pool add no class image. With a single
pool this is exactly the one class stream of a single-folder run.
"""

from __future__ import annotations

from .examples import derived_seed, folder_examples
from .streams import Draw, make_stream


class ClassStreams:
    def __init__(self, streams: list, pool_of_subset: list[int | None]):
        self.streams, self.pool_of_subset = streams, pool_of_subset

    @classmethod
    def build(cls, subsets, seed: int, resolution: int, buckets: bool) -> "ClassStreams | None":
        pools = list(dict.fromkeys(s.classes for s in subsets if s.classes is not None))
        if not pools:
            return None
        streams = []
        for k, pool in enumerate(pools):
            examples = folder_examples(pool.folders, "class", loss_weight=pool.prior_loss_weight)
            order_seed = derived_seed("class-order", seed) if k == 0 else derived_seed("class-order", seed, k)
            streams.append(make_stream(examples, order_seed, resolution, 1, buckets))
        return cls(streams, [None if s.classes is None else pools.index(s.classes) for s in subsets])

    def draw_like(self, batch_number: int, subset_of_draw: list[int], draws: list[Draw]) -> list[tuple]:
        """[(class stream, its draws)] for an instance batch, pools in order of first appearance."""
        groups: dict[int, list[Draw]] = {}
        for subset, draw in zip(subset_of_draw, draws):
            pool = self.pool_of_subset[subset]
            if pool is not None:
                groups.setdefault(pool, []).append(draw)
        return [(self.streams[p], self.streams[p].draw_like(batch_number, like)) for p, like in groups.items()]
