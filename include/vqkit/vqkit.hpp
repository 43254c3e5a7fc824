// vqkit/vqkit.hpp - umbrella header: the whole CPU library (lighter ones:
// <vqkit/quantizer.hpp>, <vqkit/layers.hpp>, <vqkit/tokenizer.hpp>; the CUDA backend
// is separate: cuda/include/vqkit/cuda/*.cuh, docs/cuda.md). MPI lives in
// vqkit/distributed/mpi.hpp, which is not included here (it needs <mpi.h>).
#pragma once

#include "vqkit/tokenizer.hpp"
#include "vqkit/util/moving_clusters.hpp"
#include "vqkit/util/progress.hpp"
