// Definitions behind vector_math.h: the scalar functions, and on AVX2 builds their vector-ABI
// variants for every vector width GCC may pick (b: 128-bit, c/d: 256-bit, e: 512-bit with AVX-512).
// This file must not include vector_math.h: with the `declare simd` declarations in view, GCC would
// generate these variants itself, as loops over the scalar function.
#include <cmath>

#if defined(__AVX2__)
#include <immintrin.h>
#include <sleef.h>
#endif

extern "C" {
float adanorm_expm1f(float x) { return std::expm1(x); }
double adanorm_expm1(double x) { return std::expm1(x); }
float adanorm_log1pf(float x) { return std::log1p(x); }
double adanorm_log1p(double x) { return std::log1p(x); }

#if defined(__AVX2__)
// 128-bit variants run the 256-bit function on the zero-extended vector (libtorch exports no SSE SLEEF).
#define ADANORM_VECTOR_VARIANTS(name, sleef_f8, sleef_d4, sleef_f16, sleef_d8)                                       \
  __m128 _ZGVbN4v_##name##f(__m128 x) { return _mm256_castps256_ps128(sleef_f8(_mm256_zextps128_ps256(x))); }      \
  __m128d _ZGVbN2v_##name(__m128d x) { return _mm256_castpd256_pd128(sleef_d4(_mm256_zextpd128_pd256(x))); }      \
  __m256 _ZGVcN8v_##name##f(__m256 x) { return sleef_f8(x); }                                                      \
  __m256d _ZGVcN4v_##name(__m256d x) { return sleef_d4(x); }                                                       \
  __m256 _ZGVdN8v_##name##f(__m256 x) { return sleef_f8(x); }                                                      \
  __m256d _ZGVdN4v_##name(__m256d x) { return sleef_d4(x); }                                                       \
  ADANORM_AVX512_VARIANTS(name, sleef_f16, sleef_d8)
#if defined(__AVX512F__)
#define ADANORM_AVX512_VARIANTS(name, sleef_f16, sleef_d8)       \
  __m512 _ZGVeN16v_##name##f(__m512 x) { return sleef_f16(x); } \
  __m512d _ZGVeN8v_##name(__m512d x) { return sleef_d8(x); }
#else
#define ADANORM_AVX512_VARIANTS(name, sleef_f16, sleef_d8)
#endif

ADANORM_VECTOR_VARIANTS(adanorm_expm1, Sleef_expm1f8_u10, Sleef_expm1d4_u10, Sleef_expm1f16_u10, Sleef_expm1d8_u10)
ADANORM_VECTOR_VARIANTS(adanorm_log1p, Sleef_log1pf8_u10, Sleef_log1pd4_u10, Sleef_log1pf16_u10, Sleef_log1pd8_u10)
#endif
}
