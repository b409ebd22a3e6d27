"""The parts of ``python -m benchmarks.gpu_check``: one module per section, all runnable on CPU at tiny sizes.

    env               versions, the GPU, regional torch.compile, the run's time budget
    noise             gate noise that is the same numbers on every device and leaves no near-ties
    ops               the ops on the device against the float64 reference (2, 3, 5 experts; eager and compiled)
    recursion_check   one training step of ThinkingPixelDiT and an apply_recursion diffusers DiT: device vs CPU float64
    op_speed          routed_lora against its peers, host time and device work items per call, CUDA-graph capture
    processors        the recursion written without tp_kernels: every expert by einsums, or a masked loop
    train_step        whole training steps of DiT-XL/2- and SD3-medium-shaped diffusers models, variant by variant
"""
