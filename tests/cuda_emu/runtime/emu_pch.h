// Everything every unit of the harness includes, precompiled once per build (emu_build.py).
#pragma once
#include "emu_cuda.h"
#include "emu_aten.h"
#include <mma.h>
#include <array>
#include <cmath>
#include <functional>
#include <map>
