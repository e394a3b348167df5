// CUDA kernel of compress_topk: kdfast::topk_compress_cuda (declared in bindings.cpp).
// Contract: the same as topk_compress_cpu (types.h TopKCompressArgs): per teacher row the k
// largest logits sorted by descending value (ties: lower index first, so the indices equal the
// CPU kernel's), log softmax(t/T) at them over the full row, and the log of the mass outside
// them (−inf when none), computed as a log-sum-exp over exactly the non-kept entries (never
// 1 − Σ), so it stays exact when tiny. NaN or +inf anywhere in a row, or a row of only −inf,
// gives NaN log-probabilities and tail (its indices then follow the order with NaN ranked as
// −inf).
// Supports 1 <= k <= kCudaMaxTopK (types.h); enqueued on `stream`, no allocation, no synchronisation.
//
// Kernel: one block per row reads the row once from memory, in tiles of blockDim x W
// consecutive elements (W = 8 for float math, 2 for float64; 16-byte loads, the next tile's
// loads in flight while the current one is processed), in index order. A threshold key theta
// splits each tile (the CPU kernel's rule): once k candidates are held, an element whose key
// is <= theta (the smallest kept key) cannot be in the top k (k earlier entries are at least
// as large and earlier wins ties), so it goes straight into the thread's tail sum; the others
// ("hits") are appended to a shared-memory buffer at positions from a block scan
// (deterministic). The first tile seeds theta when k <= blockDim: the k-th largest of the
// threads' maxima bounds the top k from below (k elements are at least as large), so even the
// first tile appends only a few entries. When the buffer would overflow it is cut back to the best k by a radix
// select on the keys in shared memory (8-bit digits, shared histogram; ties at the cut resolved
// by a second radix select on the indices), the evicted entries join the tail sums, and theta
// rises. At the end the k survivors are bitonic-sorted in shared memory and the row's
// normaliser log(Σ_kept e^{t/T} + tail) is formed in double, as on the CPU.
// Bytes per element: one read of the teacher row; the outputs are k·(4|8 + 4|8) + 4|8 per row.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "kdfast/kdfast.h"
#include "shared_memory_plan.cuh"
#include "topk_cuda_common.cuh"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kCompressMaxBlock = 512;
constexpr int kCompressWarps = kCompressMaxBlock / 32;
// Two 512-thread blocks per multiprocessor (at most 64 registers per thread), so that one
// block's selection and sort overlap the other's streaming.
constexpr int kCompressMinBlocks = 2;  // ptxas: 64 registers, at most 4 bytes of spills

struct CompressParams {
  const void* teacher;
  int64_t teacher_row_stride;
  int64_t rows;
  int vocab;
  int k;
  int buffer_capacity;  // newcomer buffer entries: >= tile size and >= next_power_of_two(k)
  bool double_kept;     // two kept buffers; false: one, which a cut compacts in place
  double inv_temperature;
  void* indices;
  bool indices_int64;
  void* logprobs;
  void* tail_logprob;
};

// Shared state of one block; every thread keeps its own copy of the block-uniform counters.
template <class C>
struct CompressShared {
  unsigned histogram[256];
  int warp_totals[32];
  int select_bin;
  int select_above;
  int select_bin_count;
  C max_scratch[kCompressWarps][1];
  double sum_scratch[kCompressWarps][1];
  double kept_scratch[kCompressWarps][1];
  int nan_scratch[kCompressWarps][1];
};

// One radix-select digit: the bin b (among 256) of the `remaining`-th largest eligible digit,
// with `above` = number of eligible entries in higher bins and `count` = entries in bin b.
template <class C>
__device__ __forceinline__ void find_digit(CompressShared<C>& sh, unsigned remaining) {
  __syncthreads();  // histogram complete
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned lane_sum = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) lane_sum += sh.histogram[lane * 8 + b];
    // suffix[lane] = sum of lane_sum over lanes >= lane
    unsigned suffix = lane_sum;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned other = __shfl_down_sync(0xffffffffu, suffix, offset);
      if (lane + offset < 32) suffix += other;
    }
    const unsigned above_lane = suffix - lane_sum;  // entries in lanes > lane
    if (above_lane < remaining && suffix >= remaining) {
      unsigned above = above_lane;
      for (int b = 7; b >= 0; --b) {
        const unsigned c = sh.histogram[lane * 8 + b];
        if (above + c >= remaining) {
          sh.select_bin = lane * 8 + b;
          sh.select_above = static_cast<int>(above);
          sh.select_bin_count = static_cast<int>(c);
          break;
        }
        above += c;
      }
    }
  }
  __syncthreads();
}

// Radix select over `total` entries: the threshold key of the `remaining`-th largest value of
// get(e) among eligible entries (get returns false for ineligible ones). On return,
// `remaining` is how many entries equal to the threshold belong to the selection and
// `all_ties` says whether that is all of them. With kEarlyExit the search stops at the first
// digit whose bin is selected whole; the threshold is then the lowest key of that bin (every
// eligible key >= it is selected), else it is the exact key of the `remaining`-th largest.
template <class C, class Key, int kBits, bool kEarlyExit, class Get>
__device__ __forceinline__ Key radix_select(CompressShared<C>& sh, int total, unsigned& remaining, bool& all_ties,
                                            Get&& get) {
  Key prefix = 0, mask = 0;
  all_ties = false;
#pragma unroll 1
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.histogram[i] = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      Key key;
      if (get(e, key) && (key & mask) == prefix) atomicAdd(&sh.histogram[static_cast<int>((key >> shift) & 255)], 1u);
    }
    find_digit(sh, remaining);
    const int bin = sh.select_bin;
    remaining -= static_cast<unsigned>(sh.select_above);
    const unsigned count = static_cast<unsigned>(sh.select_bin_count);
    prefix |= static_cast<Key>(bin) << shift;
    mask |= static_cast<Key>(255) << shift;
    all_ties = count == remaining;
    if (kEarlyExit && all_ties) return prefix;
  }
  return prefix;
}

// The candidate buffers of one block in dynamic shared memory: kept[2] (k entries each, one
// current and one being written by a cut) and the newcomer buffer. Where shared memory is
// short (shared_memory_plan.cuh) kept[0] and kept[1] are one buffer and a cut compacts it in
// place: round r of the compaction reads entries [r B, r B + B) (B = blockDim) before the
// block scan's barriers and writes survivors to positions below r B + B, each at most its
// own entry's position, so no write reaches an entry that is still to be read.
template <class Key>
struct Buffers {
  Key* kept_keys[2];
  int* kept_index[2];
  Key* new_keys;
  int* new_index;
  // Kept buffer `which` (0 or 1), chosen by a select: indexing the arrays with a run-time value
  // would put them in local memory (ptxas: local loads in the candidate loops).
  __device__ __forceinline__ Key* keys(int which) const { return which == 0 ? kept_keys[0] : kept_keys[1]; }
  __device__ __forceinline__ int* index(int which) const { return which == 0 ? kept_index[0] : kept_index[1]; }
};

template <class C>
struct BlockState {
  using Key = typename OrderedKey<C>::Key;
  int current;  // which kept buffer holds the kept entries
  int kept;     // entries in it
  int fresh;    // entries in the newcomer buffer
  bool full;    // kept == k after a cut, or theta seeded from the first tile: theta is valid
  Key theta;
};

// Cuts kept ∪ newcomers back to the best min(k, total) entries (key descending, index
// ascending), adding the evicted ones to the thread's tail. Every thread calls it.
template <class C>
__device__ void cut_candidates(CompressShared<C>& sh, Buffers<typename OrderedKey<C>::Key>& buf, BlockState<C>& st,
                               int k, ThreadTail<C>& tail, const ScaledExp<C>& exp_over_t) {
  using Traits = OrderedKey<C>;
  using Key = typename Traits::Key;
  const int total = st.kept + st.fresh;
  const Key* keys_a = buf.keys(st.current);
  const int* index_a = buf.index(st.current);
  const int m = st.kept;
  auto entry = [&](int e, Key& key, int& index) {
    if (e < m) {
      key = keys_a[e];
      index = index_a[e];
    } else {
      key = buf.new_keys[e - m];
      index = buf.new_index[e - m];
    }
  };
  if (total <= k) {  // keep everything: append the newcomers in order
    Key* keys = buf.keys(st.current);
    int* index = buf.index(st.current);
    for (int e = threadIdx.x; e < st.fresh; e += blockDim.x) {
      keys[m + e] = buf.new_keys[e];
      index[m + e] = buf.new_index[e];
    }
    st.kept = total;
    st.fresh = 0;
    __syncthreads();
    if (total == k) {
      // theta = the smallest kept key (by a one-digit-at-a-time select of the k-th largest).
      unsigned remaining = static_cast<unsigned>(k);
      bool all_ties = false;
      st.theta = radix_select<C, Key, Traits::kBits, false>(sh, total, remaining, all_ties, [&](int e, Key& key) {
        key = keys[e];
        return true;
      });
      st.full = true;
    }
    return;
  }
  unsigned remaining = static_cast<unsigned>(k);
  bool all_ties = false;
  const Key threshold = radix_select<C, Key, Traits::kBits, false>(sh, total, remaining, all_ties, [&](int e, Key& key) {
    int index;
    entry(e, key, index);
    return true;
  });
  // Ties at the threshold: keep the `remaining` lowest indices (largest ~index).
  uint32_t index_threshold = 0;
  if (!all_ties) {
    bool index_ties = false;
    index_threshold = radix_select<C, uint32_t, 32, true>(sh, total, remaining, index_ties, [&](int e, uint32_t& key) {
      Key value_key;
      int index;
      entry(e, value_key, index);
      key = ~static_cast<uint32_t>(index);
      return value_key == threshold;
    });
  }
  // Compaction into the other kept buffer in entry order (block scan: deterministic).
  const int next = 1 - st.current;
  Key* out_keys = buf.keys(next);
  int* out_index = buf.index(next);
  int written = 0;
  for (int base = 0; base < total; base += blockDim.x) {
    const int e = base + threadIdx.x;
    bool keep = false;
    Key key = 0;
    int index = 0;
    if (e < total) {
      entry(e, key, index);
      keep = key > threshold || (key == threshold && ~static_cast<uint32_t>(index) >= index_threshold);
      if (!keep) tail.add_one(Traits::to_value(key), exp_over_t);
    }
    int round_total = 0;
    const int position = block_exclusive_scan(keep ? 1 : 0, sh.warp_totals, round_total);
    if (keep) {
      out_keys[written + position] = key;
      out_index[written + position] = index;
    }
    written += round_total;
  }
  __syncthreads();
  st.current = next;
  st.kept = k;
  st.fresh = 0;
  st.full = true;
  st.theta = threshold;
}

template <class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kCompressMaxBlock, kCompressMinBlocks) topk_compress_kernel(CompressParams p) {
  using Traits = OrderedKey<C>;
  using Key = typename Traits::Key;
  constexpr int kW = kGroupWidth<C>;
  __shared__ CompressShared<C> sh;
  extern __shared__ uint4 dynamic_shared[];

  const int64_t row = blockIdx.x;
  const int k = p.k, vocab = p.vocab;
  Buffers<Key> buf;
  {
    const int copies = p.double_kept ? 2 : 1;
    Key* keys = reinterpret_cast<Key*>(dynamic_shared);
    buf.kept_keys[0] = keys;
    buf.kept_keys[1] = keys + (copies - 1) * k;
    buf.new_keys = keys + copies * k;
    int* index = reinterpret_cast<int*>(keys + copies * k + p.buffer_capacity);
    buf.kept_index[0] = index;
    buf.kept_index[1] = index + (copies - 1) * k;
    buf.new_index = index + copies * k;
  }
  const typename TX::Raw* t_row = static_cast<const typename TX::Raw*>(p.teacher) + row * p.teacher_row_stride;
  const ScaledExp<C> exp_over_t(static_cast<C>(p.inv_temperature));

  BlockState<C> st;
  st.current = 0;
  st.kept = 0;
  st.fresh = 0;
  st.full = false;
  st.theta = 0;
  ThreadTail<C> tail;
  int nan_count = 0;

  const int team = blockDim.x;
  const int row_groups = (vocab + kW - 1) / kW;
  const int tiles = (row_groups + team - 1) / team;
  const int complete_groups = vocab / kW;
  FullBatch<TX, C, kVectorized, true> raw;
  {
    const int first_of_tile0 = static_cast<int>(threadIdx.x) * kW;
    if (static_cast<int>(threadIdx.x) < complete_groups) raw.load(t_row, &first_of_tile0);
  }
  for (int tile = 0; tile < tiles; ++tile) {
    const int my_group = tile * team + threadIdx.x;
    const int first = my_group * kW;
    C x[kW];
    if (my_group < complete_groups) {
      raw.to_compute(x);
      const int next_group = my_group + team;
      if (next_group < complete_groups) {
        const int next_first = next_group * kW;
        raw.load(t_row, &next_first);
      }
    } else {
      load_partial_batch<TX, C, true>(t_row, &first, vocab, x);  // -inf past the row end
    }
    Key keys[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) keys[e] = Traits::from_value(x[e]);
    if (tile == 0 && k <= team) {
      // Seed theta from the first tile: with K the k-th largest of the threads' maxima, k
      // elements of the tile are >= K, so no element below K can be in the top k (whatever
      // its index). Keys of positions past the row end count as 0, below every real key.
      Key thread_max = 0;
#pragma unroll
      for (int e = 0; e < kW; ++e) thread_max = first + e < vocab && keys[e] > thread_max ? keys[e] : thread_max;
      // The threads' maxima go to the newcomer buffer, still empty in tile 0 (capacity >= tile
      // >= team); the radix select's last barrier precedes the tile's appends. Keeping them
      // out of the static shared memory lets k = 4096 in float32 fit in 99 KB (sm_86/sm_89).
      Key* seed_keys = buf.new_keys;
      seed_keys[threadIdx.x] = thread_max;
      __syncthreads();
      unsigned remaining = static_cast<unsigned>(k);
      bool all_ties = false;
      const Key seed = radix_select<C, Key, Traits::kBits, false>(sh, team, remaining, all_ties, [&](int e, Key& key) {
        key = seed_keys[e];
        return true;
      });
      if (seed > 0) {  // block-uniform
        st.full = true;
        st.theta = seed - 1;
      }
    }
    bool hit[kW];
    int hits = 0;
#pragma unroll
    for (int e = 0; e < kW; ++e) {
      const bool inside = first + e < vocab;
      nan_count += inside && x[e] != x[e] ? 1 : 0;
      hit[e] = inside && (!st.full || keys[e] > st.theta);
      hits += hit[e] ? 1 : 0;
      if (hit[e] || x[e] != x[e]) x[e] = negative_infinity<C>();
    }
    tail.add(x, exp_over_t);
    int tile_hits = 0;
    const int offset = block_exclusive_scan(hits, sh.warp_totals, tile_hits);
    if (tile_hits == 0) continue;
    if (st.fresh + tile_hits > p.buffer_capacity) cut_candidates(sh, buf, st, k, tail, exp_over_t);
    int position = st.fresh + offset;
#pragma unroll
    for (int e = 0; e < kW; ++e) {
      if (hit[e]) {
        buf.new_keys[position] = keys[e];
        buf.new_index[position] = first + e;
        ++position;
      }
    }
    st.fresh += tile_hits;
    // The next tile's scan barriers order these writes before any later cut reads them.
  }
  __syncthreads();
  if (st.fresh > 0 || st.kept != k) cut_candidates(sh, buf, st, k, tail, exp_over_t);

  // Bitonic sort of the k survivors (key descending, index ascending) in the newcomer buffer,
  // padded to a power of two with entries that sort last.
  int padded = 1;
  while (padded < k) padded <<= 1;
  Key* sort_keys = buf.new_keys;
  int* sort_index = buf.new_index;
  for (int e = threadIdx.x; e < padded; e += blockDim.x) {
    sort_keys[e] = e < k ? buf.keys(st.current)[e] : Key(0);
    sort_index[e] = e < k ? buf.index(st.current)[e] : 0x7fffffff;
  }
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < padded / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool descending = (i & size) == 0;
        const Key key_i = sort_keys[i], key_j = sort_keys[j];
        const int index_i = sort_index[i], index_j = sort_index[j];
        const bool j_first = key_j > key_i || (key_j == key_i && index_j < index_i);
        if (j_first == descending) {
          sort_keys[i] = key_j;
          sort_keys[j] = key_i;
          sort_index[i] = index_j;
          sort_index[j] = index_i;
        }
      }
      __syncthreads();
    }
  }

  // Normalise over the full row in double: log Z = ref/T + log(Σ_kept e^{(t − ref)/T} + tail).
  C tail_max_c;
  const double tail_sum = block_tail_sum(tail, p.inv_temperature, tail_max_c, sh.max_scratch, sh.sum_scratch);
  const double tail_max = static_cast<double>(tail_max_c);
  const double top = static_cast<double>(Traits::to_value(sort_keys[0]));
  const double reference = top > tail_max ? top : tail_max;
  double kept[1] = {0.0};
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    kept[0] += ::exp((static_cast<double>(Traits::to_value(sort_keys[j])) - reference) * p.inv_temperature);
  }
  team_all_reduce(kept, sh.kept_scratch, team, SumOp{});
  int nans[1] = {nan_count};
  team_all_reduce(nans, sh.nan_scratch, team, SumOp{});
  const double tail_scaled = tail_sum > 0.0 ? tail_sum * ::exp((tail_max - reference) * p.inv_temperature) : 0.0;
  const double log_total = ::log(kept[0] + tail_scaled);
  // NaN, +inf or only -inf logits: every output of the row is NaN (the tail too).
  const bool poisoned = nans[0] > 0 || tail_sum != tail_sum ||
                        reference == -std::numeric_limits<double>::infinity() ||
                        reference == std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();

  C* logprobs = static_cast<C*>(p.logprobs) + row * k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const double value = (static_cast<double>(Traits::to_value(sort_keys[j])) - reference) * p.inv_temperature - log_total;
    logprobs[j] = static_cast<C>(poisoned ? nan : value);
    if (p.indices_int64) {
      static_cast<int64_t*>(p.indices)[row * k + j] = sort_index[j];
    } else {
      static_cast<int32_t*>(p.indices)[row * k + j] = sort_index[j];
    }
  }
  if (threadIdx.x == 0) {
    double tail_logprob = -std::numeric_limits<double>::infinity();
    if (tail_sum > 0.0) tail_logprob = (tail_max - reference) * p.inv_temperature + ::log(tail_sum) - log_total;
    static_cast<C*>(p.tail_logprob)[row] = static_cast<C>(poisoned ? nan : tail_logprob);
  }
}

// Threads per row: 128 for short rows, 512 for long ones.
inline int compress_block_size(int64_t vocab, int width) {
  return vocab <= int64_t(128) * width * 4 ? 128 : kCompressMaxBlock;
}

template <class TX, class C>
void compress_typed(const TopKCompressArgs& args, cudaStream_t stream) {
  using Key = typename OrderedKey<C>::Key;
  if (args.rows == 0) return;
  CompressParams p;
  p.teacher = args.teacher;
  p.teacher_row_stride = args.teacher_row_stride;
  p.rows = args.rows;
  p.vocab = static_cast<int>(args.vocab);
  p.k = static_cast<int>(args.k);
  p.inv_temperature = 1.0 / args.temperature;
  p.indices = args.indices;
  p.indices_int64 = args.indices_int64;
  p.logprobs = args.logprobs;
  p.tail_logprob = args.tail_logprob;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  // The fastest layout the device's shared memory holds (shared_memory_plan.cuh).
  const size_t static_bytes = sizeof(CompressShared<C>);
  const TopKSharedPlan plan = plan_topk_shared(args.k, compress_block_size(args.vocab, kGroupWidth<C>),
                                               kGroupWidth<C>, sizeof(Key) + sizeof(int), static_bytes,
                                               static_cast<size_t>(limit));
  if (!plan.fits) {
    throw std::invalid_argument("compress_topk (CUDA): k=" + std::to_string(args.k) + " needs " +
                                std::to_string(plan.dynamic_bytes + static_bytes) +
                                " bytes of shared memory per block, the device offers " + std::to_string(limit));
  }
  const int block = plan.block;
  p.buffer_capacity = plan.buffer_capacity;
  p.double_kept = plan.double_kept;
  const size_t shared_bytes = plan.dynamic_bytes;
  if (args.rows > int64_t(0x7fffffff)) throw std::invalid_argument("compress_topk (CUDA): too many rows for one launch");
  const bool vectorized = rows_are_16_byte_aligned(args.teacher, args.teacher_row_stride, sizeof(typename TX::Raw));
  auto launch = [&](auto kernel) {
    allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), shared_bytes);
    kernel<<<static_cast<unsigned>(args.rows), block, shared_bytes, stream>>>(p);
    check_launch("topk_compress_kernel");
  };
  if (vectorized) {
    launch(topk_compress_kernel<TX, C, true>);
  } else {
    launch(topk_compress_kernel<TX, C, false>);
  }
}

}  // namespace
}  // namespace cuda

void topk_compress_cuda(const TopKCompressArgs& args, int device_index, uintptr_t stream_handle) {
  if (args.k < 1 || args.k > args.vocab) throw std::invalid_argument("compress_topk (CUDA): need 1 <= k <= vocab");
  if (args.k > kCudaMaxTopK) {
    throw std::invalid_argument("compress_topk (CUDA): k=" + std::to_string(args.k) + " exceeds the kernel's limit " +
                                std::to_string(kCudaMaxTopK));
  }
  cuda::check_vocab_fits(args.vocab, "compress_topk (CUDA)");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.teacher_dtype) {
    case DType::Float32: return cuda::compress_typed<cuda::Float32Storage, float>(args, stream);
    case DType::BFloat16: return cuda::compress_typed<cuda::BFloat16Storage, float>(args, stream);
    case DType::Float16: return cuda::compress_typed<cuda::Float16Storage, float>(args, stream);
    case DType::Float64: return cuda::compress_typed<cuda::Float64Storage, double>(args, stream);
  }
  throw std::invalid_argument("compress_topk (CUDA): unsupported teacher dtype code " +
                              std::to_string(static_cast<int>(args.teacher_dtype)));
}

}  // namespace kdfast
