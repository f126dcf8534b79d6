// Macros shared by the math headers (no ATen here, so they stay plain C++/CUDA).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define B3F_HD __host__ __device__ __forceinline__
#else
#define B3F_HD inline
#endif

// CPU hot loops are compiled three times (AVX-512, AVX2, baseline) and picked at load time by the
// dynamic loader, like ATen's own DispatchStub: a wheel built on one x86 machine stays portable and
// still uses the widest vectors of the machine it runs on. ISA-only clones, not "arch=...": GCC
// inlines the (default-arch) math helpers only into callers of the same arch, and a PLT call per
// element is what an "arch=" clone got.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(BLIP3O_FAST_NO_CLONES)
#define B3F_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define B3F_CPU_CLONES
#endif

#if defined(__GNUC__)
#define B3F_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define B3F_ALWAYS_INLINE inline
#endif
