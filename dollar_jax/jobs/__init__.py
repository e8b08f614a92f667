"""The jobs `python -m dollar_jax.main` runs: each turns a config and a work directory into artefacts.

  world data   -> <data>/shapes_world                    (videos + captions + factor labels)
  autoencoder  -> <workdir>/autoencoder                  (model folder; trained on the videos)
  precompute   -> <data>/world_latents                   (latents + text embeddings of every clip)
  teacher      -> <workdir>/teacher                      (model folder; the tiny DiT, VP conjugate-v)
  distill      -> <workdir>/student                      (the few-step student)
  demo         -> all of the above, evaluation, REPORT.md
"""
