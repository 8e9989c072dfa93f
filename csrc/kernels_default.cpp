// The kernels built for the baseline instruction set of the compiler's target.
#define TRANSXNET_KERNEL_NS base
#include "kernels.h"
