"""The cost model: what each backend sends, computes and overlaps, how long that takes on a
given machine, and which backend backend="auto" picks.

    import seqpar.cost as cost
    p = cost.Problem(batch=1, seq_len=2**20, heads_q=32, heads_kv=8, head_dim=128, world=64)
    print(cost.explain(p, cost.SPEC_SHEETS["h100-sxm"]))      # table + the choice
    cost.predict("ring", p, cost.SPEC_SHEETS["h100-sxm"]).seconds
    profile = cost.calibrate()                                  # collective: measure this machine
    with cost.use_profile(profile):
        o = seqpar.attention(q, k, v, backend="auto")

Files: `traffic.py` bytes and messages per backend (the formulas the tests assert),
`hardware.py` profiles (spec sheets with sources, measured JSON), `model.py` the alpha-beta +
roofline schedules, `predict.py` predictions, legality, choice and explanation,
`calibrate.py` the measurement (`python -m seqpar.cost calibrate`), `training_memory.py` the
peak memory of a whole training step and the longest sequence that fits,
`partial_prefill.py` inference's pass-KV vs pass-Q for a new turn against a cached context.
"""

from .calibrate import calibrate
from .hardware import CPU_DEFAULT, SPEC_SHEETS, Link, Profile, profile_for, use_profile
from .predict import (AUTO_CANDIDATES, Prediction, choose, explain, legality, memory_bytes,
                      predict, predict_all, problem_of)
from .traffic import Problem, Volume, backend_volume
from .training_memory import ModelShape, Savers, Training, longest_sequence, step_memory

__all__ = ["Problem", "Volume", "backend_volume", "Profile", "Link", "SPEC_SHEETS", "CPU_DEFAULT",
           "profile_for", "use_profile", "AUTO_CANDIDATES", "Prediction", "predict", "predict_all",
           "choose", "explain", "legality", "memory_bytes", "problem_of", "calibrate",
           "ModelShape", "Savers", "Training", "step_memory", "longest_sequence"]
