"""Hand-written Triton kernels and their torch references, registered as torch.library ops."""
