// Definitions shared by every header that both the CPU and the CUDA kernels compile.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DMFAST_HD __host__ __device__ __forceinline__
#else
#define DMFAST_HD inline
#endif
