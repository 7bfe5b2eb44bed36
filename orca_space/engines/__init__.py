"""The in-process engines: token ids in, token events out (see `requests.py`).

`ladder.py` picks the one that serves, fastest first, each self-checked (`selfcheck.py`):
- `batched.py`: every chat shares each decode step over a slot-indexed ring KV cache
  (`kv_cache.py`), with Mistral's forward written out as small functions (`mistral.py`, over the
  weights of `hf_weights.py`) and the decode step (`decode_step.py`) replayed as CUDA graphs
  where the device has them (`graphs`) or run eagerly (`eager`); per-row sampling on the device
  (`sampling.py`); host-side decisions in `scheduling.py`, device specifics in `device.py`;
  what each slot holds (a live request or an ended one's kept cache) in `slots.py`, and which
  kept cache a new prompt starts from, for whom, in `prefix_cache.py`;
- `reference.py`: transformers' own `generate`, one request at a time (`reference`).
"""
