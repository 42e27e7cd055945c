// IPL_HOST_DEVICE marks the shared arithmetic of csrc/common: nvcc compiles it for host and device, g++ sees
// plain inline functions.
#pragma once

#ifdef __CUDACC__
#define IPL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IPL_HOST_DEVICE inline
#endif
