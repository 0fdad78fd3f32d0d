"""Λ-shaped (LM-Infinite) attention kernels over paged KV caches; torch + triton only,
no vLLM import, so they can be tested and benchmarked on a machine without vLLM.

  pattern.py       which keys a query sees and at what rotary distance
  rope.py          rotary embedding (relative distances; float64 absolute angles)
  paged.py         the two cache layouts, K/V store, span gather, local + global softmax
  naive.py         dense float64 reference the fast paths are tested against
  absolute_cpu.py  keys rotated at absolute positions in vLLM's CPU layout: C++ kernel
                   (absolute_cpp.py builds csrc/absolute_cpu.cpp) and its torch twin
  raw_torch.py     raw (unrotated) keys, rotated when read: torch
  raw_triton.py    the same on Triton (CUDA, or TRITON_INTERPRET=1 on CPU)
"""
