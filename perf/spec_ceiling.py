"""The physical ceiling speculation is measured against: what a decode step feeding each row w
tokens costs against a plain one (w = 1), on the embedded model, in this process.

Rows hold a ~560-token KV (a spec turn's context) in the decode batch's own KV (raggedkv.RaggedKV);
each width is timed over several steps, rejected positions dropped as verification does. If every
drafted token were accepted, a width-w step would make w tokens a row for `ratio` times a plain
step's cost: `ceiling` = w / ratio is the most speculation can speed decoding at that width.
"""

from __future__ import annotations

import statistics
import time

CONTEXT = 560


def measure(rows_list: tuple[int, ...] = (1, 8), widths: tuple[int, ...] = (1, 2, 3, 4, 6, 8), repeats: int = 7) -> dict:
    import semcache  # noqa: F401  (loads the system BLAS first)
    import mlx.core as mx
    from semcache.engine.forward import Forward
    from semcache.engine.models import load_model
    from semcache.engine.raggedkv import RaggedKV, trim_rows

    model = load_model(None).model
    forward = Forward(model)
    out: dict = {"context_tokens": CONTEXT, "repeats": repeats}
    for rows in rows_list:
        cache = [RaggedKV([0] * rows) for _ in model.layers]
        forward(mx.random.randint(0, 40000, (rows, CONTEXT)), cache, last_logits=False)
        mx.eval([c.state for c in cache])
        seconds = {}
        for w in widths:
            times = []
            for i in range(repeats):
                tokens = mx.random.randint(0, 40000, (rows, w))
                start = time.perf_counter()
                logits = forward(tokens, cache, last_logits=True) if w == 1 else forward.every(tokens, cache)
                mx.eval(logits, [c.state for c in cache])
                times.append(time.perf_counter() - start)
                trim_rows(cache, [w - 1 - (r + i) % w for r in range(rows)] if w > 1 else [0] * rows)
            seconds[w] = statistics.median(times)
        out[f"{rows}_rows"] = {str(w): {"seconds": s, "ratio": s / seconds[1], "ceiling": w * seconds[1] / s}
                               for w, s in seconds.items()}
    return out
