// Headers with shared inline code, included by the per-ISA kernel files BEFORE
// their target pragma so that this code is compiled for the baseline ISA, as in
// every other file; a copy compiled for AVX2/AVX-512 could otherwise be the one
// the linker keeps and run on a CPU without those instructions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/intrinsics.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
