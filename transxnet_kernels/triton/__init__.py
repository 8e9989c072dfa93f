"""The ``triton`` backend: one module per op family (``idconv``, ``ms_ffn``, ``osra_attention``), each with
its kernels, launch plans, torch.library ops and autograd; ``common`` holds what they share."""
