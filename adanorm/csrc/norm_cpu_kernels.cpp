// Fused CPU normalization kernels: every statistics mode in two memory passes per direction, either layout.
//
// Every mode is "statistics per (sample, channel), pooled over a set of (sample, channel) pairs,
// then a per-(sample, channel) affine map". The sets are the channels of one group of a sample
// (instance: one channel, layer: all channels) or one channel across the batch (batch mode).
// Two kernels cover all modes, both layouts and both directions:
//
//   channel_sums    one read pass: per (n, c) the sums of two terms with x shifted by a per-(n, c)
//                   value. Forward: Σu and Σu² of u = x − shift, shift = one value of the channel
//                   (of the run, where a statistic is summed as one flat run: see plan_of), so
//                   float sums stay accurate for large means. Backward: Σdy and Σdy·(x − μ).
//   channel_affine  one read+write pass: y = a·x + b forward, dx = a·dy + b·x + c backward, with
//                   per-(n, c) coefficients, written in the input's own layout.
//
// Channels-last input (N, *spatial, C) is reduced along its contiguous channel rows with one
// accumulator per channel, so no layout copy is ever made; contiguous input (N, C, *spatial) along
// its contiguous spatial rows. Work is split into (sample, chunk) tasks with per-task partials,
// so one sample with few channels still keeps every thread busy, and partials are added in task
// order, so results do not depend on the thread count. Inner sums are float over short blocks
// (vectorized), flushed into double.
//
// Contiguous per-sample modes read the input as (N·G, C/G, S): each (sample, group) block is one
// pseudo-sample whose statistic is summed as one flat run. With enough of them, each thread takes
// whole cache-sized units and runs a unit's affine pass right after its sums (plan_of). Other
// per-sample inputs above kWholeBatchBytes go one sample at a time (statistics, then its affine
// pass while the sample is still in the last-level cache); batch mode needs every sample before
// its affine pass. The operators and autograd that call these kernels are in norm_cpu_ops.cpp.
// Measurements behind the design choices below: BENCHMARKS.md, "What makes it fast".

#include "norm_cpu_kernels.h"
#include "vector_math.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Lerp.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace adanorm {

namespace {

constexpr int64_t kChunkElements = 1 << 15;  // elements per task: a chunk fits in L2
// Below this many elements per thread a pass runs faster on one thread than split (fork/join costs more).
constexpr int64_t kMinElementsPerThread = 1 << 14;
constexpr int64_t kBlockValues = 256;  // values per channel summed in float before flushing to double
// Inputs up to this size make one pass per direction over all samples; larger ones go a sample at
// a time, so that a sample is still in the last-level cache for its affine pass.
constexpr int64_t kWholeBatchBytes = 8 << 20;

// Element conversions written as plain integer arithmetic, so that loops over bfloat16 vectorize
// like float loops (c10::BFloat16's own conversions do not). Rounding is to nearest even, NaN stays NaN.
template <typename scalar_t>
inline at::opmath_type<scalar_t> to_acc(scalar_t value) {
  return static_cast<at::opmath_type<scalar_t>>(value);
}
template <>
inline float to_acc<c10::BFloat16>(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
template <typename scalar_t>
inline scalar_t from_acc(at::opmath_type<scalar_t> value) {
  return static_cast<scalar_t>(value);
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(value != value ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// What one pass sums per (n, c) (Terms) or writes per element (Epilogue) reads x (the input, or the
// output y of a fused norm + activation), dy where it needs it, and per-(n, c) values: a Terms' shift and
// parameter, an Epilogue's coefficients a, b, c and parameter. The parameter is the activation's: the
// negative side's slope (identity 1, leaky ReLU, PReLU) or ELU's α.

struct ForwardTerms {  // Σu, Σu² of u = x − shift
  template <typename acc_t>
  static inline void add(acc_t x, acc_t /*dy*/, acc_t shift, acc_t /*parameter*/, acc_t& first, acc_t& second) {
    const acc_t u = x - shift;
    first += u;
    second += u * u;
  }
};

struct BackwardTerms {  // Σdy, Σdy·(x − shift)
  template <typename acc_t>
  static inline void add(acc_t x, acc_t dy, acc_t shift, acc_t /*parameter*/, acc_t& first, acc_t& second) {
    first += dy;
    second += dy * (x - shift);
  }
};

// The pre-activation z and dz = dy·act'(z), recovered from the activation's output y = act(z): y ≤ 0 exactly
// where z ≤ 0 (positive slopes), and the derivative at 0 is the negative side's, as PyTorch's backward takes it.
// The selects vectorize (blends, no branch that mispredicts on half the elements) because the library is
// built with -fno-trapping-math (cpu_build.CFLAGS).
struct SlopeInverse {  // y = z > 0 ? z : s·z
  template <typename acc_t>
  static inline void of(acc_t y, acc_t dy, acc_t slope, acc_t& z, acc_t& dz) {
    const bool positive = y > acc_t(0);
    z = positive ? y : y / slope;
    dz = positive ? dy : dy * slope;
  }
};

// ELU's two sides are selected without a branch and with log1p/expm1 called for every element
// (vector_math.h's contract), so that its passes vectorize: max(v, 0) + min(0, w) is v where v > 0 and w
// elsewhere, because w has v's sign (α > 0); NaN in v propagates, NaN or ∞ in the unused w does not. dz's
// factor is blended with a 0/1 mask, exact on both sides for finite y.
struct EluInverse {  // y = z > 0 ? z : α·(e^z − 1); y = −α exactly is taken as the smallest z resolved there
  template <typename acc_t>
  static inline void of(acc_t y, acc_t dy, acc_t alpha, acc_t& z, acc_t& dz) {
    const acc_t ratio = std::max(y / alpha, acc_t(-1) + std::numeric_limits<acc_t>::epsilon() / 2);
    z = std::max(y, acc_t(0)) + std::min(acc_t(0), vector_log1p(ratio));
    const acc_t positive = y > acc_t(0) ? acc_t(1) : acc_t(0);
    dz = dy * (positive + (acc_t(1) - positive) * (y + alpha));
  }
};

template <typename Inverse>
struct ActivationBackwardTerms {  // Σdz, Σdz·(z − shift), with z, dz recovered from y, dy
  template <typename acc_t>
  static inline void add(acc_t y, acc_t dy, acc_t shift, acc_t parameter, acc_t& first, acc_t& second) {
    acc_t z, dz;
    Inverse::of(y, dy, parameter, z, dz);
    first += dz;
    second += dz * (z - shift);
  }
};

struct NegativeSideTerms {  // Σdy·min(y, 0): with y = s·z there, s times a PReLU slope's gradient Σdy·z
  template <typename acc_t>
  static inline void add(acc_t y, acc_t dy, acc_t /*shift*/, acc_t /*parameter*/, acc_t& first, acc_t& /*second*/) {
    first += dy * std::min(y, acc_t(0));
  }
};

struct NormOutput {  // y = a·x + b
  static constexpr bool kReadsDy = false;
  template <typename acc_t>
  static inline acc_t apply(acc_t x, acc_t /*dy*/, acc_t a, acc_t b, acc_t /*c*/, acc_t /*parameter*/) {
    return a * x + b;
  }
};

struct SlopeOutput {  // y = act(a·x + b), act(z) = z > 0 ? z : s·z
  static constexpr bool kReadsDy = false;
  template <typename acc_t>
  static inline acc_t apply(acc_t x, acc_t /*dy*/, acc_t a, acc_t b, acc_t /*c*/, acc_t slope) {
    const acc_t z = a * x + b;
    return z > acc_t(0) ? z : slope * z;
  }
};

struct EluOutput {  // y = act(a·x + b), act(z) = z > 0 ? z : α·(e^z − 1)
  static constexpr bool kReadsDy = false;
  template <typename acc_t>
  static inline acc_t apply(acc_t x, acc_t /*dy*/, acc_t a, acc_t b, acc_t /*c*/, acc_t alpha) {
    const acc_t z = a * x + b;
    return std::max(z, acc_t(0)) + std::min(acc_t(0), alpha * vector_expm1(z));  // as EluInverse's z
  }
};

template <typename Inverse>
struct NormGradient {  // dx = a·dv + b·v + c, with (v, dv) = (x, dy), or (z, dz) recovered from (y, dy)
  static constexpr bool kReadsDy = true;
  template <typename acc_t>
  static inline acc_t apply(acc_t x, acc_t dy, acc_t a, acc_t b, acc_t c, acc_t parameter) {
    acc_t v = x, dv = dy;
    if constexpr (!std::is_void_v<Inverse>) Inverse::of(x, dy, parameter, v, dv);
    return a * dv + b * v + c;
  }
};

// Adds Σ of Terms over x[begin, end) (and dy) into first/second, in kLanes independent lanes
// added pairwise at the end: `omp simd reduction` adds its lanes one after another through the
// stack, a dependency chain that costs more than the sums of a short row.
constexpr int kLanes = 16;
template <typename Terms, typename scalar_t, typename acc_t>
inline void row_sums(const scalar_t* x, const scalar_t* dy, acc_t shift, acc_t parameter, int64_t begin, int64_t end,
                     acc_t& first, acc_t& second) {
  acc_t lanes_first[kLanes] = {}, lanes_second[kLanes] = {};
  int64_t s = begin;
  for (; s + kLanes <= end; s += kLanes) {
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) {
      Terms::add(to_acc(x[s + lane]), to_acc(dy[s + lane]), shift, parameter, lanes_first[lane], lanes_second[lane]);
    }
  }
  for (; s < end; ++s) {  // the tail into one accumulator: a lane picked at run time would pin the lanes to memory
    Terms::add(to_acc(x[s]), to_acc(dy[s]), shift, parameter, first, second);
  }
#pragma GCC unroll 4
  for (int width = kLanes / 2; width > 0; width /= 2) {  // unrolled, so that the lanes stay in registers
#pragma GCC unroll 8
    for (int lane = 0; lane < width; ++lane) {
      lanes_first[lane] += lanes_first[lane + width];
      lanes_second[lane] += lanes_second[lane + width];
    }
  }
  first += lanes_first[0];
  second += lanes_second[0];
}

// A (N, C, S) tensor in memory: channels-last rows hold the C values of one position, contiguous
// rows the S values of one channel. A task covers `chunk` rows (channels-last) or `chunk` values
// of one row (contiguous); `tasks_per_sample` of them cover a sample.
struct Geometry {
  int64_t N, C, S;
  bool channels_last;
  int64_t chunk, pieces_per_row, tasks_per_sample;

  Geometry(const at::Tensor& x, bool channels_last_)
      : Geometry(x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), channels_last_) {}

  Geometry(int64_t N_, int64_t C_, int64_t S_, bool channels_last_) : N(N_), C(C_), S(S_), channels_last(channels_last_) {
    if (channels_last) {
      chunk = std::max<int64_t>(1, kChunkElements / C);
      pieces_per_row = 1;
      tasks_per_sample = (S + chunk - 1) / chunk;
    } else {
      chunk = std::min<int64_t>(S, kChunkElements);
      pieces_per_row = (S + chunk - 1) / chunk;
      tasks_per_sample = C * pieces_per_row;
    }
  }
  // Tasks per thread at least, so that each thread gets kMinElementsPerThread elements.
  int64_t grain() const { return std::max<int64_t>(1, kMinElementsPerThread / (channels_last ? chunk * C : chunk)); }
  int64_t offset(int64_t n, int64_t c, int64_t s) const { return channels_last ? (n * S + s) * C + c : (n * C + c) * S + s; }

  // Contiguous layout: a task's row (its flat n·C + c index) and its values [begin, end) in that
  // row, with no division when rows are whole tasks (short rows, where per-task cost shows).
  struct RowPiece {
    int64_t row, begin, end;
  };
  RowPiece row_piece(int64_t task) const {
    if (pieces_per_row == 1) return {task, 0, S};
    const int64_t begin = task % pieces_per_row * chunk;
    return {task / pieces_per_row, begin, std::min(S, begin + chunk)};
  }
};

// The samples [first, last) processed together, and the statistics pooled over them: groups > 0
// pools the channels of each group within a sample, groups == 0 pools each channel over samples.
struct Unit {
  int64_t first, last, groups;
};

// The flat n·C + c indices that one statistic pools: `count` of them, `stride` apart from `first`
// (the channels of a group are adjacent; a channel across samples is C apart).
struct Members {
  int64_t first, count, stride;
  struct Iterator {
    int64_t index, stride;
    int64_t operator*() const { return index; }
    Iterator& operator++() { index += stride; return *this; }
    bool operator!=(const Iterator& other) const { return index != other.index; }
  };
  Iterator begin() const { return {first, stride}; }
  Iterator end() const { return {first + count * stride, stride}; }
  int64_t front() const { return first; }
  int64_t size() const { return count; }
};

// Calls visit(members) for every statistic of the unit.
template <typename Visit>
void for_each_statistic(const Unit& unit, int64_t C, Visit visit) {
  if (unit.groups == 0) {
    for (int64_t c = 0; c < C; ++c) visit(Members{unit.first * C + c, unit.last - unit.first, C});
    return;
  }
  const int64_t per_group = C / unit.groups;
  for (int64_t n = unit.first; n < unit.last; ++n)
    for (int64_t g = 0; g < unit.groups; ++g) visit(Members{n * C + g * per_group, per_group, 1});
}

// Channels-last passes over a run of `rows` rows of C values. Common channel counts get a compile-time
// row width (kC > 0; 0 means C at run time): the per-channel accumulators and coefficients then stay
// in vector registers across the rows, where with a run-time width they live in memory and each
// row's load-add-store chain through L1 holds back the streaming reads of x. The same loops run
// either way, adding in the same order.
template <typename Body>
inline void with_row_width(int64_t C, const Body& body) {
  switch (C) {
    case 8: return body(std::integral_constant<int64_t, 8>{});
    case 16: return body(std::integral_constant<int64_t, 16>{});
    case 32: return body(std::integral_constant<int64_t, 32>{});
    case 48: return body(std::integral_constant<int64_t, 48>{});
    case 64: return body(std::integral_constant<int64_t, 64>{});
    case 96: return body(std::integral_constant<int64_t, 96>{});
    case 128: return body(std::integral_constant<int64_t, 128>{});
    case 256: return body(std::integral_constant<int64_t, 256>{});
    default: return body(std::integral_constant<int64_t, 0>{});
  }
}

template <typename Terms, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void sum_rows(const scalar_t* x, const scalar_t* dy, const acc_t* shift,
                                                    const acc_t* parameter, int64_t width, int64_t rows, acc_t* first,
                                                    acc_t* second) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      Terms::add(to_acc(x[r * width + c]), to_acc(dy[r * width + c]), shift[c], parameter[c], first[c], second[c]);
    }
  }
}

// Per-channel sums of Terms over the rows (x and dy at their first row), written to first/second.
template <int64_t kC, typename Terms, typename scalar_t, typename acc_t>
inline void channels_last_sums(const scalar_t* x, const scalar_t* dy, const acc_t* shift, const acc_t* parameter,
                               int64_t C, int64_t rows, acc_t* first, acc_t* second) {
  if constexpr (kC > 0) {
    acc_t row_first[kC] = {}, row_second[kC] = {}, row_shift[kC], row_parameter[kC];
    std::copy(shift, shift + kC, row_shift);
    std::copy(parameter, parameter + kC, row_parameter);
    sum_rows<Terms>(x, dy, row_shift, row_parameter, kC, rows, row_first, row_second);
    std::copy(row_first, row_first + kC, first);
    std::copy(row_second, row_second + kC, second);
  } else {
    std::fill(first, first + C, acc_t(0));
    std::fill(second, second + C, acc_t(0));
    sum_rows<Terms>(x, dy, shift, parameter, C, rows, first, second);
  }
}

// The coefficients of an affine pass: per (n, c) in the pass's flat table order.
template <typename acc_t>
struct Coefficients {
  const acc_t *a, *b, *c, *parameter;
};

template <typename Epilogue, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void affine_rows(const scalar_t* x, const scalar_t* dy, Coefficients<acc_t> k,
                                                       int64_t width, int64_t rows, scalar_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const acc_t dyv = Epilogue::kReadsDy ? to_acc(dy[r * width + c]) : acc_t(0);
      out[r * width + c] = from_acc<scalar_t>(
          Epilogue::apply(to_acc(x[r * width + c]), dyv, k.a[c], k.b[c], k.c[c], k.parameter[c]));
    }
  }
}

// The Epilogue over the rows, with per-channel coefficients.
template <int64_t kC, typename Epilogue, typename scalar_t, typename acc_t>
inline void channels_last_affine(const scalar_t* x, const scalar_t* dy, Coefficients<acc_t> k, int64_t C,
                                 int64_t rows, scalar_t* out) {
  if constexpr (kC > 0) {
    acc_t row_a[kC], row_b[kC], row_c[kC], row_parameter[kC];
    std::copy(k.a, k.a + kC, row_a);
    std::copy(k.b, k.b + kC, row_b);
    std::copy(k.c, k.c + kC, row_c);
    std::copy(k.parameter, k.parameter + kC, row_parameter);
    affine_rows<Epilogue>(x, dy, Coefficients<acc_t>{row_a, row_b, row_c, row_parameter}, kC, rows, out);
  } else {
    affine_rows<Epilogue>(x, dy, k, C, rows, out);
  }
}

// Adds per-(n, c) sums of Terms over the unit's samples into first/second (double, N·C).
template <typename scalar_t, typename Terms>
void channel_sums(const scalar_t* x, const scalar_t* dy, const double* shift, const double* parameter, const Geometry& g,
                  const Unit& unit, double* first, double* second) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, S = g.S;
  const int64_t task_begin = unit.first * g.tasks_per_sample, task_end = unit.last * g.tasks_per_sample;
  const int64_t width = g.channels_last ? C : 1;  // partial sums per task
  std::vector<double> partial_first((task_end - task_begin) * width, 0.0);
  std::vector<double> partial_second((task_end - task_begin) * width, 0.0);

  at::parallel_for(task_begin, task_end, g.grain(), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_first(width), block_second(width), shift_acc(width), parameter_acc(width);
    for (int64_t task = begin; task < end; ++task) {
      double* out_first = partial_first.data() + (task - task_begin) * width;
      double* out_second = partial_second.data() + (task - task_begin) * width;
      if (g.channels_last) {
        const int64_t n = task / g.tasks_per_sample, piece = task % g.tasks_per_sample;
        for (int64_t c = 0; c < C; ++c) {
          shift_acc[c] = static_cast<acc_t>(shift[n * C + c]);
          parameter_acc[c] = static_cast<acc_t>(parameter[n * C + c]);
        }
        const int64_t s_begin = piece * g.chunk, s_end = std::min(S, s_begin + g.chunk);
        for (int64_t s0 = s_begin; s0 < s_end; s0 += kBlockValues) {
          const int64_t offset = g.offset(n, 0, s0);
          with_row_width(C, [&](auto width) {
            channels_last_sums<decltype(width)::value, Terms>(x + offset, dy + offset, shift_acc.data(),
                                                               parameter_acc.data(), C,
                                                               std::min(s_end, s0 + kBlockValues) - s0,
                                                               block_first.data(), block_second.data());
          });
          for (int64_t c = 0; c < C; ++c) {
            out_first[c] += block_first[c];
            out_second[c] += block_second[c];
          }
        }
      } else {
        const auto piece = g.row_piece(task);
        const acc_t row_shift = static_cast<acc_t>(shift[piece.row]);
        const acc_t row_parameter = static_cast<acc_t>(parameter[piece.row]);
        const scalar_t* xr = x + piece.row * S;
        const scalar_t* dyr = dy + piece.row * S;
        for (int64_t s0 = piece.begin; s0 < piece.end; s0 += kBlockValues) {
          acc_t first_acc = 0, second_acc = 0;
          row_sums<Terms>(xr, dyr, row_shift, row_parameter, s0, std::min(piece.end, s0 + kBlockValues), first_acc,
                          second_acc);
          out_first[0] += first_acc;
          out_second[0] += second_acc;
        }
      }
    }
  });

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t local = task - task_begin;
    if (g.channels_last) {
      const int64_t n = task / g.tasks_per_sample;
      for (int64_t c = 0; c < C; ++c) {
        first[n * C + c] += partial_first[local * C + c];
        second[n * C + c] += partial_second[local * C + c];
      }
    } else {
      const int64_t row = g.row_piece(task).row;
      first[row] += partial_first[local];
      second[row] += partial_second[local];
    }
  }
}

// out = Epilogue(x, dy) with per-(n, c) coefficients, over the unit's samples. `out` may be `x`: every
// element is read before it is written, by the same task.
template <typename scalar_t, typename Epilogue>
void channel_affine(const scalar_t* x, const scalar_t* dy, Coefficients<at::opmath_type<scalar_t>> k, const Geometry& g,
                    const Unit& unit, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C, S = g.S;
  at::parallel_for(unit.first * g.tasks_per_sample, unit.last * g.tasks_per_sample, g.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (g.channels_last) {
        const int64_t n = task / g.tasks_per_sample, piece = task % g.tasks_per_sample;
        const Coefficients<acc_t> kn{k.a + n * C, k.b + n * C, k.c + n * C, k.parameter + n * C};
        const int64_t s_begin = piece * g.chunk, s_end = std::min(S, s_begin + g.chunk);
        const int64_t offset = g.offset(n, 0, s_begin);
        with_row_width(C, [&](auto width) {
          channels_last_affine<decltype(width)::value, Epilogue>(x + offset, dy + offset, kn, C, s_end - s_begin,
                                                                 out + offset);
        });
      } else {
        const auto piece = g.row_piece(task);
        const acc_t ac = k.a[piece.row], bc = k.b[piece.row], cc = k.c[piece.row], pc = k.parameter[piece.row];
        const int64_t offset = piece.row * S;
        const scalar_t* xr = x + offset;
        const scalar_t* dyr = dy + offset;
        scalar_t* outr = out + offset;
#pragma omp simd
        for (int64_t s = piece.begin; s < piece.end; ++s) {
          const acc_t dyv = Epilogue::kReadsDy ? to_acc(dyr[s]) : acc_t(0);
          outr[s] = from_acc<scalar_t>(Epilogue::apply(to_acc(xr[s]), dyv, ac, bc, cc, pc));
        }
      }
    }
  });
}


void check_input(const at::Tensor& t, const at::Tensor& x, bool channels_last, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "adanorm CPU kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "adanorm CPU kernel: ", name, " dtype ", t.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "adanorm CPU kernel: ", name, " shape differs from the input's");
  TORCH_CHECK(t.is_contiguous(layout_format(x, channels_last)), "adanorm CPU kernel: ", name,
              " is not dense in the requested layout; call .contiguous(memory_format=...) first");
}

// How one call walks its input: the geometry of its affine passes and of its forward sums, the
// units it processes, and whether units run side by side (each on one thread) or one after
// another (each split over the threads).
struct Plan {
  Geometry g, stats;
  std::vector<Unit> units;
  bool across_units;
};

Plan plan_of(const at::Tensor& x, int64_t groups, bool channels_last) {
  Geometry g(x, channels_last);
  const bool pseudo_samples = !channels_last && groups > 0;
  if (pseudo_samples) {
    // Contiguous per-sample statistics: each (sample, group) pair's values are one contiguous
    // block, so the input reads as (N·G, C/G, S) with one statistic per pseudo-sample.
    g = Geometry(g.N * groups, g.C / groups, g.S, false);
    groups = 1;
  }
  // A pseudo-sample's statistic is over one contiguous run of values, summed as that flat run,
  // (N·G, 1, C/G·S). A channels-last sample in layer mode is summed per channel and pooled, as in
  // group mode: its rows keep C independent accumulators busy, where a flat run has one chain of
  // lane sums.
  const Geometry stats = groups == 1 && !channels_last ? Geometry(g.N, 1, g.C * g.S, false) : g;
  std::vector<Unit> units;
  const int64_t threads = at::get_num_threads();
  if (pseudo_samples && g.N >= threads && (g.N % threads == 0 || g.N >= 8 * threads)) {
    // Pseudo-samples that share out evenly over the threads: threads take whole units of them and
    // run a unit's affine pass right after its sums, while the unit is still in the core's cache,
    // in both directions. A unit holds about a chunk of values (fewer, cheaper units per call),
    // and there are a multiple of the thread count of them, sizes differing by one at most.
    const int64_t per_unit = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(g.C * g.S, 1));
    const int64_t count = std::min(g.N, threads * ((g.N + threads * per_unit - 1) / (threads * per_unit)));
    for (int64_t u = 0; u < count; ++u) units.push_back(Unit{u * g.N / count, (u + 1) * g.N / count, groups});
    return {g, stats, std::move(units), true};
  }
  if (groups == 0 || x.nbytes() <= kWholeBatchBytes) return {g, stats, {Unit{0, g.N, groups}}, false};
  for (int64_t n = 0; n < g.N; ++n) units.push_back(Unit{n, n + 1, groups});
  return {g, stats, std::move(units), false};
}

// Calls body(unit) for every unit of the plan, side by side or in turn as the plan says (the
// passes' own parallel_for runs inline inside a parallel region).
template <typename Body>
void for_each_unit(const Plan& plan, const Body& body) {
  if (!plan.across_units) {
    for (const Unit& unit : plan.units) body(unit);
    return;
  }
  const int64_t unit_elements = plan.g.N / static_cast<int64_t>(plan.units.size()) * plan.g.C * plan.g.S;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(unit_elements, 1));
  at::parallel_for(0, static_cast<int64_t>(plan.units.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) body(plan.units[u]);
  });
}

// γ or β of channel c as a double, read once from a parameter of any floating dtype (elementwise
// tensor ops on such tiny vectors cost more than the loops).
struct ChannelParameter {
  std::vector<double> values;
  double missing;
  ChannelParameter(const c10::optional<at::Tensor>& parameter, double missing_) : missing(missing_) {
    if (!parameter.has_value() || !parameter->defined()) return;
    const at::Tensor dense = parameter->contiguous();
    values.resize(dense.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "adanorm_read_parameter", [&] {
      const scalar_t* data = dense.const_data_ptr<scalar_t>();
      for (size_t c = 0; c < values.size(); ++c) values[c] = static_cast<double>(data[c]);
    });
  }
  // One value (a PReLU with one slope) stands for every channel.
  double operator[](int64_t c) const { return values.empty() ? missing : values[values.size() == 1 ? 0 : c]; }
};

// running ← (1 − momentum)·running + momentum·value, in the buffer's own dtype, as nn.BatchNorm.
void blend_running(at::Tensor& running, const std::vector<double>& value, double momentum) {
  TORCH_CHECK(running.is_contiguous() && running.numel() == static_cast<int64_t>(value.size()),
              "adanorm CPU kernel: running statistics must be contiguous with one value per channel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running.scalar_type(), "adanorm_running_stats", [&] {
    scalar_t* data = running.data_ptr<scalar_t>();
    for (size_t c = 0; c < value.size(); ++c) {
      data[c] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(data[c]) + momentum * value[c]);
    }
  });
  torch::autograd::impl::bump_version(running);  // an in-place update, as autograd must see it
}

// A norm's forward: statistics of x, then out = Epilogue(x) with a = γ·rstd, b = β − μ·a and the
// activation's parameter per (n, c). Fills the (N, C) mean and rstd tables and, for batch statistics
// (groups == 0), each channel's batch mean and unbiased variance. `out` may be x itself: each unit's
// statistics are complete before its affine pass writes.
template <typename Epilogue>
void forward_pass(const at::Tensor& x, const ChannelParameter& gamma, const ChannelParameter& beta,
                  const ChannelParameter& activation_parameter, int64_t groups, double eps, bool channels_last,
                  at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, std::vector<double>& batch_mean,
                  std::vector<double>& batch_unbiased_var) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(groups == 0 || channels % groups == 0, "adanorm CPU kernel: ", channels,
              " channels do not split into ", groups, " groups");
  const Plan plan = plan_of(x, groups, channels_last);
  const Geometry& g = plan.g;  // flat (n, c) table indices are the same in the plan's geometry
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adanorm_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    const Geometry& stats_g = plan.stats;
    const int64_t tables = stats_g.N * stats_g.C;
    std::vector<double> shift(tables), sum_u(tables, 0.0), sum_u2(tables, 0.0);
    std::vector<acc_t> scale(g.N * g.C), offset(g.N * g.C), parameter(g.N * g.C);
    for (int64_t i = 0; i < g.N * g.C; ++i) parameter[i] = static_cast<acc_t>(activation_parameter[i % channels]);
    double* mean_data = mean.data_ptr<double>();
    double* rstd_data = rstd.data_ptr<double>();
    // A shift of ±Inf or NaN would make every u NaN (Inf − Inf), turning an Inf mean into NaN where
    // native plain sums keep it Inf: such a run is summed unshifted, so non-finite values reach the
    // statistics (Inf or NaN mean, NaN variance) exactly as they reach native batch/group norm.
    for (int64_t n = 0; n < stats_g.N; ++n)
      for (int64_t c = 0; c < stats_g.C; ++c) {
        const double first = static_cast<double>(to_acc(x_data[stats_g.offset(n, c, 0)]));
        shift[n * stats_g.C + c] = std::isfinite(first) ? first : 0.0;
      }

    for_each_unit(plan, [&](const Unit& unit) {
      channel_sums<scalar_t, ForwardTerms>(x_data, x_data, shift.data(), shift.data(), stats_g, unit, sum_u.data(),
                                           sum_u2.data());
      std::vector<std::pair<double, double>> statistics;  // (mean, rstd) in for_each_statistic's order
      for_each_statistic(unit, stats_g.C, [&](const Members& members) {
        // Chan's formula over the members' (mean, M2): robust where E[x²] − E[x]² is not.
        const double S = static_cast<double>(stats_g.S);
        const double count = S * members.size();
        double total = 0.0;
        for (int64_t i : members) total += shift[i] * S + sum_u[i];
        const double stat_mean = total / count;
        double m2 = 0.0;
        for (int64_t i : members) {
          const double channel_mean = shift[i] + sum_u[i] / S;
          m2 += std::max(sum_u2[i] - sum_u[i] * sum_u[i] / S, 0.0) + S * (channel_mean - stat_mean) * (channel_mean - stat_mean);
        }
        statistics.emplace_back(stat_mean, 1.0 / std::sqrt(m2 / count + eps));
        if (unit.groups == 0) {
          const int64_t c = members.front() % channels;
          batch_mean[c] = stat_mean;
          batch_unbiased_var[c] = m2 / std::max(count - 1.0, 1.0);
        }
      });
      size_t next = 0;
      for_each_statistic(unit, g.C, [&](const Members& members) {
        const auto [stat_mean, stat_rstd] = statistics[next++];
        for (int64_t i : members) {
          const int64_t c = i % channels;
          const double a = gamma[c] * stat_rstd;
          mean_data[i] = stat_mean;
          rstd_data[i] = stat_rstd;
          scale[i] = static_cast<acc_t>(a);
          offset[i] = static_cast<acc_t>(beta[c] - stat_mean * a);
        }
      });
      channel_affine<scalar_t, Epilogue>(
          x_data, x_data, Coefficients<acc_t>{scale.data(), offset.data(), offset.data(), parameter.data()}, g, unit,
          out_data);
    });
  });
}

// A norm's backward from what its forward saved, read as v: the input x (Terms BackwardTerms), or the
// output y of a fused activation (ActivationBackwardTerms, which recover z and dz from y and dy). Per (n, c)
// the tables give x̂ = p·(v' − shift), v' = x or z: p = rstd, shift = μ for the input; p = 1/γ, shift = β for
// the pre-activation. Then with sums Σdv' and Σdv'·(v' − shift) per (n, c) over each statistic's M values,
//   dx = rstd·(γ·dv' − mean(γ·dv') − x̂·mean(γ·dv'·x̂)),   dγ = Σdv'·x̂,   dβ = Σdv',
// where γ·p·Σdv'·(v' − shift) = Σγ·dv'·x̂, so γ divides a coefficient per (n, c), never an element.
template <typename Terms, typename Gradient>
void backward_pass(const at::Tensor& dy, const at::Tensor& v, const ChannelParameter& gamma, const double* shift,
                   const double* p, const ChannelParameter& activation_parameter, const double* rstd_data,
                   int64_t groups, bool channels_last, bool need_input, at::Tensor& grad_input,
                   std::vector<double>& grad_weight_sum, std::vector<double>& grad_bias_sum) {
  const int64_t channels = v.size(1);
  const Plan plan = plan_of(v, groups, channels_last);
  const Geometry& g = plan.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "adanorm_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v_data = v.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    std::vector<double> parameter(g.N * g.C), sum_dv(g.N * g.C, 0.0), sum_dv_u(g.N * g.C, 0.0);
    std::vector<acc_t> dv_scale(g.N * g.C), v_scale(g.N * g.C), constant(g.N * g.C), parameter_acc(g.N * g.C);
    for (int64_t i = 0; i < g.N * g.C; ++i) {
      parameter[i] = activation_parameter[i % channels];
      parameter_acc[i] = static_cast<acc_t>(parameter[i]);
    }

    for_each_unit(plan, [&](const Unit& unit) {
      channel_sums<scalar_t, Terms>(v_data, dy_data, shift, parameter.data(), g, unit, sum_dv.data(),
                                    sum_dv_u.data());
      for_each_statistic(unit, g.C, [&](const Members& members) {
        const double count = static_cast<double>(g.S) * members.size();
        const double stat_rstd = rstd_data[members.front()];
        double sum_g = 0.0, sum_g_xhat = 0.0;
        for (int64_t i : members) {
          const int64_t c = i % channels;
          sum_g += gamma[c] * sum_dv[i];
          sum_g_xhat += gamma[c] * p[i] * sum_dv_u[i];
        }
        const double mean_g = sum_g / count, mean_g_xhat = sum_g_xhat / count;
        for (int64_t i : members) {
          const int64_t c = i % channels;
          dv_scale[i] = static_cast<acc_t>(stat_rstd * gamma[c]);
          v_scale[i] = static_cast<acc_t>(-stat_rstd * mean_g_xhat * p[i]);
          constant[i] = static_cast<acc_t>(stat_rstd * (mean_g_xhat * p[i] * shift[i] - mean_g));
        }
      });
      if (need_input) {
        channel_affine<scalar_t, Gradient>(
            v_data, dy_data, Coefficients<acc_t>{dv_scale.data(), v_scale.data(), constant.data(), parameter_acc.data()},
            g, unit, grad_input.data_ptr<scalar_t>());
      }
    });
    // dγ, dβ sum over samples, so after every unit: units may run side by side.
    for (int64_t i = 0; i < g.N * g.C; ++i) {
      grad_weight_sum[i % channels] += p[i] * sum_dv_u[i];
      grad_bias_sum[i % channels] += sum_dv[i];
    }
  });
}

// dγ and dβ summed in float64, rounded once into the weight's dtype (float64 without a weight).
std::vector<at::Tensor> parameter_gradients(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                            const std::vector<double>& grad_weight_sum,
                                            const std::vector<double>& grad_bias_sum) {
  const int64_t channels = x.size(1);
  const at::ScalarType parameter_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : at::kDouble;
  const auto parameter_options = x.options().dtype(parameter_dtype).memory_format(at::MemoryFormat::Contiguous);
  auto grad_weight = at::empty({channels}, parameter_options);
  auto grad_bias = at::empty({channels}, parameter_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, parameter_dtype, "adanorm_parameter_grads", [&] {
    scalar_t* grad_weight_data = grad_weight.data_ptr<scalar_t>();
    scalar_t* grad_bias_data = grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      grad_weight_data[c] = static_cast<scalar_t>(grad_weight_sum[c]);
      grad_bias_data[c] = static_cast<scalar_t>(grad_bias_sum[c]);
    }
  });
  return {grad_weight, grad_bias};
}

at::Tensor statistics_table(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kDouble).memory_format(at::MemoryFormat::Contiguous));
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation == kIdentity || activation == kSlope || activation == kElu,
              "adanorm CPU kernel: activation code ", activation, " is not 0 (identity), 1 (slope) or 2 (ELU)");
}

}  // namespace

// Declared, with its contract, in norm_cpu_kernels.h.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                                     const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var, double momentum,
                                     bool channels_last) {
  check_input(x, x, channels_last, "input");
  auto mean = statistics_table(x), rstd = statistics_table(x);
  std::vector<double> batch_mean(x.size(1)), batch_unbiased_var(x.size(1));
  auto y = at::empty_like(x, layout_format(x, channels_last));
  forward_pass<NormOutput>(x, ChannelParameter(weight, 1.0), ChannelParameter(bias, 0.0), ChannelParameter({}, 1.0), groups,
                           eps, channels_last, y, mean, rstd, batch_mean, batch_unbiased_var);
  if (groups == 0 && running_mean.has_value() && running_mean->defined()) {
    TORCH_CHECK(running_var.has_value() && running_var->defined(), "adanorm CPU kernel: running_var missing");
    at::Tensor running_mean_buffer = *running_mean, running_var_buffer = *running_var;
    blend_running(running_mean_buffer, batch_mean, momentum);
    blend_running(running_var_buffer, batch_unbiased_var, momentum);
  }
  return {y, mean, rstd};
}

// Declared, with its contract, in norm_cpu_kernels.h.
std::vector<at::Tensor> norm_activation_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
                                                int64_t activation, double parameter,
                                                const c10::optional<at::Tensor>& parameter_weight, at::Tensor& out,
                                                bool channels_last) {
  check_input(x, x, channels_last, "input");
  check_input(out, x, channels_last, "out");
  check_activation(activation);
  auto mean = statistics_table(x), rstd = statistics_table(x);
  std::vector<double> batch_mean(x.size(1)), batch_unbiased_var(x.size(1));
  const ChannelParameter gamma(weight, 1.0), beta(bias, 0.0), slope_or_alpha(parameter_weight, parameter);
  if (activation == kIdentity) {
    forward_pass<NormOutput>(x, gamma, beta, slope_or_alpha, groups, eps, channels_last, out, mean, rstd, batch_mean,
                             batch_unbiased_var);
  } else if (activation == kSlope) {
    forward_pass<SlopeOutput>(x, gamma, beta, slope_or_alpha, groups, eps, channels_last, out, mean, rstd, batch_mean,
                              batch_unbiased_var);
  } else {
    forward_pass<EluOutput>(x, gamma, beta, slope_or_alpha, groups, eps, channels_last, out, mean, rstd, batch_mean,
                            batch_unbiased_var);
  }
  // In x's dtype, as the running statistics they are blended into: a conversion per call costs more than a
  // small layer's passes.
  const auto vector_options = x.options().memory_format(at::MemoryFormat::Contiguous);
  auto batch_mean_tensor = at::empty({x.size(1)}, vector_options), batch_var_tensor = at::empty({x.size(1)}, vector_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adanorm_batch_statistics", [&] {
    std::transform(batch_mean.begin(), batch_mean.end(), batch_mean_tensor.data_ptr<scalar_t>(),
                   [](double value) { return static_cast<scalar_t>(value); });
    std::transform(batch_unbiased_var.begin(), batch_unbiased_var.end(), batch_var_tensor.data_ptr<scalar_t>(),
                   [](double value) { return static_cast<scalar_t>(value); });
  });
  return {mean, rstd, batch_mean_tensor, batch_var_tensor};
}

// Declared, with its contract, in norm_cpu_kernels.h.
std::vector<at::Tensor> norm_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd, int64_t groups, bool channels_last,
                                      bool need_input) {
  check_input(x, x, channels_last, "input");
  check_input(grad_output, x, channels_last, "grad_output");
  const double* mean_data = mean.const_data_ptr<double>();
  const double* rstd_data = rstd.const_data_ptr<double>();
  std::vector<double> grad_weight_sum(x.size(1), 0.0), grad_bias_sum(x.size(1), 0.0);
  at::Tensor grad_input = need_input ? at::empty_like(x, layout_format(x, channels_last)) : at::Tensor();
  backward_pass<BackwardTerms, NormGradient<void>>(grad_output, x, ChannelParameter(weight, 1.0), mean_data, rstd_data,
                                                   ChannelParameter({}, 1.0), rstd_data, groups, channels_last,
                                                   need_input, grad_input, grad_weight_sum, grad_bias_sum);
  auto parameters = parameter_gradients(x, weight, grad_weight_sum, grad_bias_sum);
  return {grad_input, parameters[0], parameters[1]};
}

// Declared, with its contract, in norm_cpu_kernels.h.
std::vector<at::Tensor> norm_activation_backward(const at::Tensor& grad_output, const at::Tensor& y,
                                                 const c10::optional<at::Tensor>& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& rstd,
                                                 int64_t groups, int64_t activation, double parameter,
                                                 const c10::optional<at::Tensor>& parameter_weight, bool channels_last,
                                                 bool need_input) {
  check_input(y, y, channels_last, "output");
  check_input(grad_output, y, channels_last, "grad_output");
  check_activation(activation);
  const int64_t channels = y.size(1), tables = y.size(0) * channels;
  const ChannelParameter gamma(weight, 1.0), beta(bias, 0.0), slope_or_alpha(parameter_weight, parameter);
  std::vector<double> shift(tables), p(tables);
  for (int64_t i = 0; i < tables; ++i) {
    shift[i] = beta[i % channels];
    p[i] = 1.0 / gamma[i % channels];
  }
  std::vector<double> grad_weight_sum(channels, 0.0), grad_bias_sum(channels, 0.0);
  at::Tensor grad_input = need_input ? at::empty_like(y, layout_format(y, channels_last)) : at::Tensor();
  const double* rstd_data = rstd.const_data_ptr<double>();
  if (activation == kElu) {
    backward_pass<ActivationBackwardTerms<EluInverse>, NormGradient<EluInverse>>(
        grad_output, y, gamma, shift.data(), p.data(), slope_or_alpha, rstd_data, groups, channels_last, need_input, grad_input,
        grad_weight_sum, grad_bias_sum);
  } else {  // identity: slope 1
    const ChannelParameter slope = activation == kSlope ? slope_or_alpha : ChannelParameter({}, 1.0);
    backward_pass<ActivationBackwardTerms<SlopeInverse>, NormGradient<SlopeInverse>>(
        grad_output, y, gamma, shift.data(), p.data(), slope, rstd_data, groups, channels_last, need_input, grad_input,
        grad_weight_sum, grad_bias_sum);
  }
  auto parameters = parameter_gradients(y, weight, grad_weight_sum, grad_bias_sum);
  return {grad_input, parameters[0], parameters[1]};
}

// Declared, with its contract, in norm_cpu_kernels.h.
bool affine_invertible(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       double max_shift_per_scale) {
  if (!weight.has_value() || !weight->defined()) return true;
  const ChannelParameter gamma(weight, 1.0), beta(bias, 0.0);
  double tiny = 0.0;  // the smallest normal |γ| of the weight's dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight->scalar_type(), "adanorm_affine_invertible", [&] {
    tiny = static_cast<double>(std::numeric_limits<scalar_t>::min());
  });
  for (int64_t c = 0; c < weight->numel(); ++c) {
    const double scale = std::abs(gamma[c]);
    if (!(scale >= tiny && std::abs(beta[c]) <= max_shift_per_scale * scale)) return false;
  }
  return true;
}

// Declared, with its contract, in norm_cpu_kernels.h.
at::Tensor activation_input_gradient(const at::Tensor& grad_output, const at::Tensor& y, int64_t activation,
                                     double parameter, const c10::optional<at::Tensor>& parameter_weight,
                                     bool channels_last) {
  check_input(y, y, channels_last, "output");
  check_input(grad_output, y, channels_last, "grad_output");
  check_activation(activation);
  if (activation == kIdentity) return grad_output;
  at::Tensor grad_z = at::empty_like(y, layout_format(y, channels_last));
  const Geometry g(y, channels_last);
  const ChannelParameter slope_or_alpha(parameter_weight, parameter);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "adanorm_activation_gradient", [&] {  // the fused step takes float32/64
    using acc_t = at::opmath_type<scalar_t>;
    // dz = 1·dv + 0·v + 0 with (v, dv) recovered from (y, dy): the backward's epilogue with unit coefficients.
    std::vector<acc_t> ones(g.N * g.C, acc_t(1)), zeros(g.N * g.C, acc_t(0)), values(g.N * g.C);
    for (int64_t i = 0; i < g.N * g.C; ++i) values[i] = static_cast<acc_t>(slope_or_alpha[i % g.C]);
    const Coefficients<acc_t> unit_map{ones.data(), zeros.data(), zeros.data(), values.data()};
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = grad_output.const_data_ptr<scalar_t>();
    scalar_t* grad_z_data = grad_z.data_ptr<scalar_t>();
    const Unit all{0, g.N, 1};
    if (activation == kElu) {
      channel_affine<scalar_t, NormGradient<EluInverse>>(y_data, dy_data, unit_map, g, all, grad_z_data);
    } else {
      channel_affine<scalar_t, NormGradient<SlopeInverse>>(y_data, dy_data, unit_map, g, all, grad_z_data);
    }
  });
  return grad_z;
}

// Declared, with its contract, in norm_cpu_kernels.h.
at::Tensor slope_gradient(const at::Tensor& grad_output, const at::Tensor& y, const at::Tensor& slopes,
                          bool channels_last) {
  check_input(y, y, channels_last, "output");
  check_input(grad_output, y, channels_last, "grad_output");
  const Geometry g(y, channels_last);
  std::vector<double> negative_side(g.N * g.C, 0.0), unused(g.N * g.C, 0.0), zeros(g.N * g.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "adanorm_slope_gradient", [&] {  // the fused step takes float32/64
    channel_sums<scalar_t, NegativeSideTerms>(y.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                                              zeros.data(), zeros.data(), g, Unit{0, g.N, 1}, negative_side.data(),
                                              unused.data());
  });
  const ChannelParameter slope(slopes, 1.0);
  const int64_t count = slopes.numel();  // one shared slope, or one per channel
  std::vector<double> sums(count, 0.0);
  for (int64_t i = 0; i < g.N * g.C; ++i) sums[count == 1 ? 0 : i % g.C] += negative_side[i];
  at::Tensor grad = at::empty_like(slopes, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, slopes.scalar_type(), "adanorm_slope_gradient_out", [&] {
    scalar_t* data = grad.data_ptr<scalar_t>();
    for (int64_t k = 0; k < count; ++k) data[k] = static_cast<scalar_t>(sums[k] / slope[k]);
  });
  return grad;
}

// Declared, with its contract, in norm_cpu_kernels.h.
void blend_running_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                             const at::Tensor& batch_mean, const at::Tensor& batch_var, double momentum,
                             const OptionalTensor& momentum_tensor, const OptionalTensor& nonfinite_skips) {
  for (const at::Tensor* t : {&running_mean, &running_var, &batch_mean, &batch_var}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == running_mean.numel() && t->scalar_type() == running_mean.scalar_type(),
                "adanorm::blend_running_stats: statistics must be contiguous, of one size and dtype");
  }
  const double factor = momentum_tensor.has_value() ? momentum_tensor->item<double>() : momentum;
  const int64_t channels = running_mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "blend_running_stats", [&] {
    const scalar_t *mean = batch_mean.const_data_ptr<scalar_t>(), *var = batch_var.const_data_ptr<scalar_t>();
    if (nonfinite_skips.has_value()) {
      for (int64_t c = 0; c < channels; ++c) {
        if (!std::isfinite(to_acc(mean[c])) || !std::isfinite(to_acc(var[c]))) {
          nonfinite_skips->add_(1);
          return;
        }
      }
    }
    // Written in place below autograd: bump the version counters as an in-place ATen op would
    // (the layers' eval rule and autograd's saved-tensor checks read them).
    running_mean.unsafeGetTensorImpl()->bump_version();
    running_var.unsafeGetTensorImpl()->bump_version();
    scalar_t *running_mean_data = running_mean.data_ptr<scalar_t>(), *running_var_data = running_var.data_ptr<scalar_t>();
    const auto weight = static_cast<at::opmath_type<scalar_t>>(factor);
    for (int64_t c = 0; c < channels; ++c) {
      running_mean_data[c] = at::native::lerp(running_mean_data[c], mean[c], weight);
      running_var_data[c] = at::native::lerp(running_var_data[c], var[c], weight);
    }
  });
}

}  // namespace adanorm
