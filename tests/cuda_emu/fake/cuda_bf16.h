// Stand-in for CUDA's header: __nv_bfloat16 is c10::BFloat16 (same bits).
#pragma once
#include "emu_aten.h"
using __nv_bfloat16 = c10::BFloat16;
