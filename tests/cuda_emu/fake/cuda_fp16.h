// Stand-in for CUDA's header: __half is c10::Half (same bits).
#pragma once
#include "emu_aten.h"
using __half = c10::Half;
