"""The Megatron checkpoint format (SPEC.md section 6), shared by the converter (hf2mg writes it, mg2hf reads it)
and the engine (training saves and loads it):

  files   folder and file names, the tracker, the `args` every rank file records; no torch
  reader  a checkpoint's recorded layout (CheckpointLayout) and its rank state dicts
  lora    LoRA adapters in a checkpoint, folded into their base weights
  torchfile  torch.save's exact bytes written one tensor at a time (hf2mg's rank files)
"""
