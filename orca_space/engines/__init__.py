"""The in-process engines: token ids in, token events out (see `requests.py`).

- `batched.py`: every chat shares each decode step over a slot-indexed ring KV cache
  (`kv_cache.py`), with Mistral's forward written out as small functions (`mistral.py`) and the
  decode step (`decode_step.py`) replayed as CUDA graphs where the device has them; per-row
  sampling on the device (`sampling.py`).
"""
