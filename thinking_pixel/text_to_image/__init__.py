"""Text-to-image: diffusers' SD3 transformer with the recursion, trained on captioned images (pixel space or a local
SD3 pipeline's latents), sampled from prompts and evaluated GenEval-style on the compositional shapes world.

Submodules (imported on use): ``training`` (the train-loop task), ``sampling`` (prompts -> images),
``conditioning`` (text encoders, VAE), ``geneval`` (the compositional benchmark), ``routing`` (expert usage).
"""
