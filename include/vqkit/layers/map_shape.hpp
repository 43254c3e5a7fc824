// vqkit/layers/map_shape.hpp - moved to vqkit/core/map_shape.hpp (every layer and the
// optimizers use it, not only layers). This header stays so that existing
// includes keep compiling; new code includes the core header.
#pragma once

#include "vqkit/core/map_shape.hpp"
