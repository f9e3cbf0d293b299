// expm1 and log1p that GCC's vectorizer can call a vector at a time (ELU's forward and inverse).
//
// On x86 builds with AVX2 the declarations carry `omp declare simd`: a vectorized loop then calls
// the x86 vector-ABI variants (_ZGV<isa>N<lanes>v_<name>), which vector_math.cpp defines with
// SLEEF's functions from libtorch_cpu, as ATen's own vectorized expm1/log1p are. Elsewhere they are
// scalar library calls. Contract for callers: call them unconditionally and select on the results
// afterwards; GCC 12 does not vectorize a loop that calls a function on one side of a select.
// Results are within 1 ULP (SLEEF's u10 and the C library alike).
#pragma once

#if defined(__AVX2__)
#define ADANORM_VECTOR_FUNCTION _Pragma("omp declare simd notinbranch")
#else
#define ADANORM_VECTOR_FUNCTION
#endif

extern "C" {
ADANORM_VECTOR_FUNCTION float adanorm_expm1f(float) __attribute__((const));
ADANORM_VECTOR_FUNCTION double adanorm_expm1(double) __attribute__((const));
ADANORM_VECTOR_FUNCTION float adanorm_log1pf(float) __attribute__((const));
ADANORM_VECTOR_FUNCTION double adanorm_log1p(double) __attribute__((const));
}

namespace adanorm {
inline float vector_expm1(float x) { return adanorm_expm1f(x); }
inline double vector_expm1(double x) { return adanorm_expm1(x); }
inline float vector_log1p(float x) { return adanorm_log1pf(x); }
inline double vector_log1p(double x) { return adanorm_log1p(x); }
}  // namespace adanorm
