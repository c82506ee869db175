// Stand-in for the real header, see emu_aten.h.
#pragma once
#include "emu_aten.h"
