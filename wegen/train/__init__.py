"""Training WeGen on the shapes world (shared/TOYWORLD.md), on the engine's own classes.

The release's recipe (SEED-X / WeGen): stage 1 trains the UNet as a detokenizer of the 64 pooled
vision features; stage 2 trains the MLLM with text cross-entropy plus MSE + cosine regression of the
image features under teacher forcing. On the toy world the same code first pretrains the small
vision tower (the stand-in for EVA-CLIP) and the VAE (the stand-in for SDXL's).

  toymodel   the toy architecture (release structure, small widths) and its tokenizer
  common     seeding, resumable stage checkpoints, progress, learning-rate schedule
  tower      stage 0: the vision tower (attribute + patch supervision) and the VAE
  stage1     the UNet detokenizer (64 features -> latents), condition dropout for CFG
  stage2     the MLLM: T2I, understanding, Prompt Self-Rewriting, multi-turn DIIC edits
  export     the trained modules -> the converted checkpoint layout (fp16 safetensors)
  run        `python -m wegen train-toy OUT`: every stage in order, resumable
"""
