"""The ``cpp`` backend: C++ CPU kernels (``csrc/``, extension ``transxnet_kernels._C``); ``ops`` registers them."""
