// vqkit/layers/parameter.hpp - moved to vqkit/core/parameter.hpp (every layer and the
// optimizers use it, not only layers). This header stays so that existing
// includes keep compiling; new code includes the core header.
#pragma once

#include "vqkit/core/parameter.hpp"
