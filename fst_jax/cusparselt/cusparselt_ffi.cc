// XLA FFI handlers that run 2:4 structured-sparse matmuls on NVIDIA sparse tensor cores through
// cuSPARSELt. Built at first use by fst_jax.cusparselt._build (g++ against the CUDA toolkit's
// headers, jax.ffi.include_dir() and the nvidia-cusparselt wheel); registered for the CUDA platform
// by fst_jax.cusparselt.load().
//
// Two targets:
//
//   fst_cslt_compress(dense A) -> uint8[capacity]
//       A is the structured operand, logically [n, k] and 2:4 along k, stored row-major
//       (buffer [n, k]) or column-major (buffer [k, n]). Writes cuSPARSELt's compressed form
//       (values + metadata, an opaque layout) into the first compressed_size bytes of the output.
//   fst_cslt_matmul(compressed A, dense B) -> D
//       D[n, m] = A[n, k] @ B[k, m], float32 accumulation, each of B and D row- or column-major.
//
// State: one cuSPARSELt handle per device (created on first use with that device current),
// structured descriptors and matmul plans cached per (shapes, dtype, layouts, algorithm), so a
// plan is set up once per shape and reused by every later call and step. Plans are never set up
// while the stream is being captured into a CUDA graph (the handlers carry no command-buffer trait,
// so XLA does not capture them; the check is a second line of defence). Workspace and the
// compression buffer come from XLA's scratch allocator.
//
// Algorithm: a fixed configuration (CUSPARSELT_MATMUL_ALG_CONFIG_ID = alg, default 0) so that
// equal inputs give equal outputs. alg = -1 asks for cusparseLtMatmulSearch once per plan; the
// chosen id is kept in the plan cache and checked once against configuration 0 on the same
// inputs; a disagreement beyond f16/bf16 tolerance discards the searched choice (counted).
//
// Debug: poison = 1 fills every output with 0xFF bytes (NaN in f16 and bf16) on the stream before
// the library writes it, so a kernel that leaves part of the output unwritten shows up as NaN.
// check = 1 runs cusparseLtSpMMAPruneCheck2 on the dense operand before compressing and fails
// the call when it is not 2:4 (synchronizes the stream: for tests).

#include <cuda_runtime_api.h>
#include <cusparseLt.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Counters, read from Python through fst_cslt_counters (tests check the plan cache with them).

enum Counter {
  kHandleInits = 0,
  kPlanInits,
  kPlanHits,
  kDescInits,
  kDescHits,
  kCompressCalls,
  kMatmulCalls,
  kSearches,
  kSearchRejected,
  kNumCounters
};
std::mutex g_counter_mu;
int64_t g_counters[kNumCounters] = {0};
void Count(Counter c) {
  std::lock_guard<std::mutex> lock(g_counter_mu);
  ++g_counters[c];
}

std::string LtError(const char* what, cusparseStatus_t s) {
  return std::string("fst_jax.cusparselt: ") + what + " failed: " + cusparseLtGetErrorName(s) +
         " (" + cusparseLtGetErrorString(s) + ")";
}
std::string CudaError(const char* what, cudaError_t e) {
  return std::string("fst_jax.cusparselt: ") + what + " failed: " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

#define LT_RETURN_IF_ERROR(expr, what)                                   \
  do {                                                                   \
    cusparseStatus_t _s = (expr);                                        \
    if (_s != CUSPARSE_STATUS_SUCCESS) return ffi::Error::Internal(LtError(what, _s)); \
  } while (0)
#define CUDA_RETURN_IF_ERROR(expr, what)                                 \
  do {                                                                   \
    cudaError_t _e = (expr);                                             \
    if (_e != cudaSuccess) return ffi::Error::Internal(CudaError(what, _e)); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Per-device state.

using DescKey = std::tuple<int64_t, int64_t, int, int>;  // n, k, dtype, row-major
using PlanKey = std::tuple<int64_t, int64_t, int64_t, int, int, int, int, int64_t>;
// n, k, m, dtype, row_a, row_b, row_d, alg

struct SparseDesc {
  cusparseLtMatDescriptor_t desc;
  size_t compressed_size = 0;
  size_t compress_buffer_size = 0;
};

struct Plan {
  cusparseLtMatDescriptor_t a, b, d;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
  bool searched = false;  // alg = -1: the search ran (on the first call)
  int chosen_alg = 0;
};

struct DeviceState {
  std::mutex mu;
  cusparseLtHandle_t handle;
  std::map<DescKey, std::unique_ptr<SparseDesc>> descs;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

std::mutex g_states_mu;
std::map<int, std::unique_ptr<DeviceState>>* g_states = new std::map<int, std::unique_ptr<DeviceState>>;
// Never destroyed: handles and plans live until the process exits (XLA may still run handlers
// during interpreter shutdown).

ffi::ErrorOr<DeviceState*> GetState() {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return ffi::Unexpected(ffi::Error::Internal(CudaError("cudaGetDevice", e)));
  std::lock_guard<std::mutex> lock(g_states_mu);
  auto it = g_states->find(device);
  if (it != g_states->end()) return it->second.get();
  auto state = std::make_unique<DeviceState>();
  cusparseStatus_t s = cusparseLtInit(&state->handle);
  if (s != CUSPARSE_STATUS_SUCCESS)
    return ffi::Unexpected(ffi::Error::Internal(LtError("cusparseLtInit", s)));
  Count(kHandleInits);
  DeviceState* out = state.get();
  (*g_states)[device] = std::move(state);
  return out;
}

ffi::ErrorOr<cudaDataType> LtType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return CUDA_R_16F;
    case ffi::DataType::BF16: return CUDA_R_16BF;
    default:
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "fst_jax.cusparselt: only float16 and bfloat16 operands are supported"));
  }
}

cusparseOrder_t Order(bool row) { return row ? CUSPARSE_ORDER_ROW : CUSPARSE_ORDER_COL; }

ffi::Error NotCapturing(cudaStream_t stream, const char* what) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  if (status != cudaStreamCaptureStatusNone)
    return ffi::Error::Internal(std::string("fst_jax.cusparselt: ") + what +
                                " must be set up outside CUDA graph capture; run the step once "
                                "without capture first");
  return ffi::Error::Success();
}

// The entry of `cache` for `key`; on a miss (never during CUDA graph capture) a new one, set up by
// `init(T*)` and kept. Counts hits and set-ups. The caller holds the state's mutex.
template <typename Key, typename T, typename Init>
ffi::ErrorOr<T*> Cached(std::map<Key, std::unique_ptr<T>>& cache, const Key& key, Counter hit,
                        Counter made, const char* what, cudaStream_t stream, Init init) {
  auto it = cache.find(key);
  if (it != cache.end()) {
    Count(hit);
    return it->second.get();
  }
  if (auto err = NotCapturing(stream, what); !err.success()) return ffi::Unexpected(err);
  auto entry = std::make_unique<T>();
  if (auto err = init(entry.get()); !err.success()) return ffi::Unexpected(err);
  Count(made);
  T* out = entry.get();
  cache[key] = std::move(entry);
  return out;
}

// The structured descriptor of A (cached; the caller holds state->mu).
ffi::ErrorOr<SparseDesc*> GetSparseDesc(DeviceState* st, int64_t n, int64_t k, cudaDataType type,
                                        bool row_a, cudaStream_t stream) {
  DescKey key{n, k, static_cast<int>(type), row_a ? 1 : 0};
  return Cached(st->descs, key, kDescHits, kDescInits, "a cuSPARSELt descriptor", stream,
                [&](SparseDesc* d) -> ffi::Error {
                  LT_RETURN_IF_ERROR(cusparseLtStructuredDescriptorInit(
                                         &st->handle, &d->desc, n, k, row_a ? k : n, 16, type,
                                         Order(row_a), CUSPARSELT_SPARSITY_50_PERCENT),
                                     "cusparseLtStructuredDescriptorInit");
                  LT_RETURN_IF_ERROR(cusparseLtSpMMACompressedSize2(&st->handle, &d->desc,
                                                                    &d->compressed_size,
                                                                    &d->compress_buffer_size),
                                     "cusparseLtSpMMACompressedSize2");
                  return ffi::Error::Success();
                });
}

// XLA's FFI scratch allocator refuses any alignment above 16 bytes ("Unsupported alignment",
// xla/ffi/ffi_api.cc kMaxAlignment; seen on an H200 with jax 0.11.2): ask for 16, which is what
// cuSPARSELt requires of its pointers, and check what came back (XLA's BFC allocator hands out
// 256-byte-aligned blocks).
constexpr size_t kScratchAlignment = 16;

ffi::ErrorOr<void*> Scratch(ffi::ScratchAllocator& scratch, size_t bytes) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  auto p = scratch.Allocate(bytes, kScratchAlignment);
  if (!p.has_value())
    return ffi::Unexpected(ffi::Error::Internal(
        "fst_jax.cusparselt: XLA's scratch allocator could not allocate " + std::to_string(bytes) +
        " bytes (alignment " + std::to_string(kScratchAlignment) + ")"));
  if (reinterpret_cast<uintptr_t>(*p) % kScratchAlignment != 0)
    return ffi::Unexpected(ffi::Error::Internal(
        "fst_jax.cusparselt: XLA's scratch allocator returned a pointer not aligned to " +
        std::to_string(kScratchAlignment) + " bytes"));
  return *p;
}

// Fills an output with 0xFF bytes (NaN in f16 and bf16) when poison is set: see "Debug" above.
ffi::Error Poison(int64_t poison, ffi::Result<ffi::AnyBuffer>& out, cudaStream_t stream) {
  if (!poison) return ffi::Error::Success();
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out->untyped_data(), 0xFF, out->size_bytes(), stream),
                       "cudaMemsetAsync (poison)");
  return ffi::Error::Success();
}

ffi::Error CheckDims(ffi::AnyBuffer buf, int64_t rows, int64_t cols, const char* name) {
  auto dims = buf.dimensions();
  if (dims.size() != 2 || dims[0] != rows || dims[1] != cols)
    return ffi::Error::InvalidArgument(std::string("fst_jax.cusparselt: buffer ") + name +
                                       " has an unexpected shape (expected [" +
                                       std::to_string(rows) + ", " + std::to_string(cols) + "])");
  return ffi::Error::Success();
}

// What both handlers start from: the device's state, held locked for the whole call (plans and
// descriptors are set up under it), and A's structured descriptor.
struct Call {
  DeviceState* st;
  std::unique_lock<std::mutex> lock;
  SparseDesc* desc;
  cudaDataType type;
};

ffi::ErrorOr<Call> Prepare(ffi::DataType dtype, int64_t n, int64_t k, int64_t row_a,
                           cudaStream_t stream) {
  auto type = LtType(dtype);
  if (!type.has_value()) return ffi::Unexpected(type.error());
  auto state = GetState();
  if (!state.has_value()) return ffi::Unexpected(state.error());
  std::unique_lock<std::mutex> lock((*state)->mu);
  auto desc = GetSparseDesc(*state, n, k, *type, row_a != 0, stream);
  if (!desc.has_value()) return ffi::Unexpected(desc.error());
  return Call{*state, std::move(lock), *desc, *type};
}

// ---------------------------------------------------------------------------------------------
// Compress.

ffi::Error CompressImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer dense,
                        ffi::Result<ffi::AnyBuffer> out, int64_t n, int64_t k, int64_t row_a,
                        int64_t poison, int64_t check) {
  if (auto e = CheckDims(dense, row_a ? n : k, row_a ? k : n, "A"); !e.success()) return e;
  auto call = Prepare(dense.element_type(), n, k, row_a, stream);
  if (!call.has_value()) return call.error();
  DeviceState* st = call->st;
  SparseDesc* d = call->desc;
  if (d->compressed_size > out->size_bytes())
    return ffi::Error::Internal(
        "fst_jax.cusparselt: the compressed operand needs " + std::to_string(d->compressed_size) +
        " bytes but fst_jax reserved " + std::to_string(out->size_bytes()) +
        "; please report this with the shape (fst_jax.cusparselt._compressed_capacity)");
  if (auto e = Poison(poison, out, stream); !e.success()) return e;
  if (check) {
    auto valid = Scratch(scratch, sizeof(int));
    if (!valid.has_value()) return valid.error();
    // Reset the flag first: scratch memory holds whatever was there before. On the H200 (2026-11-29)
    // a valid operand was rejected without this reset, presumably because the check writes only a
    // nonzero flag; not yet re-run on a GPU with it.
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(*valid, 0, sizeof(int), stream), "cudaMemsetAsync (valid)");
    LT_RETURN_IF_ERROR(cusparseLtSpMMAPruneCheck2(&st->handle, &d->desc, 1,
                                                  CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                  dense.untyped_data(), static_cast<int*>(*valid),
                                                  stream),
                       "cusparseLtSpMMAPruneCheck2");
    int host_valid = 0;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&host_valid, *valid, sizeof(int), cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync");
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (host_valid != 0)
      return ffi::Error::InvalidArgument(
          "fst_jax.cusparselt: the structured operand is not 2:4 sparse along its contracting "
          "dimension (cusparseLtSpMMAPruneCheck2)");
  }
  auto buffer = Scratch(scratch, d->compress_buffer_size);
  if (!buffer.has_value()) return buffer.error();
  LT_RETURN_IF_ERROR(cusparseLtSpMMACompress2(&st->handle, &d->desc, 1,
                                              CUSPARSE_OPERATION_NON_TRANSPOSE,
                                              dense.untyped_data(), out->untyped_data(), *buffer,
                                              stream),
                     "cusparseLtSpMMACompress2");
  Count(kCompressCalls);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Matmul.

float ToFloat(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  uint32_t sign = (bits >> 15) & 1, exp = (bits >> 10) & 0x1f, man = bits & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

// Sets the plan's algorithm configuration and builds the plan for it (the caller destroys a
// plan built before).
ffi::Error InitPlan(DeviceState* st, Plan* p, int config) {
  LT_RETURN_IF_ERROR(cusparseLtMatmulAlgSetAttribute(&st->handle, &p->alg_sel,
                                                     CUSPARSELT_MATMUL_ALG_CONFIG_ID, &config,
                                                     sizeof(config)),
                     "cusparseLtMatmulAlgSetAttribute (CONFIG_ID)");
  LT_RETURN_IF_ERROR(cusparseLtMatmulPlanInit(&st->handle, &p->plan, &p->matmul, &p->alg_sel),
                     "cusparseLtMatmulPlanInit");
  LT_RETURN_IF_ERROR(cusparseLtMatmulGetWorkspace(&st->handle, &p->plan, &p->workspace),
                     "cusparseLtMatmulGetWorkspace");
  p->chosen_alg = config;
  return ffi::Error::Success();
}

ffi::ErrorOr<Plan*> GetPlan(DeviceState* st, const PlanKey& key, cudaDataType type,
                            cudaStream_t stream) {
  // Named copies, not a structured binding: a lambda may not capture one before C++20.
  const int64_t n = std::get<0>(key), k = std::get<1>(key), m = std::get<2>(key);
  const int row_a = std::get<4>(key), row_b = std::get<5>(key), row_d = std::get<6>(key);
  const int64_t alg = std::get<7>(key);
  return Cached(st->plans, key, kPlanHits, kPlanInits, "a cuSPARSELt matmul plan", stream,
                [&](Plan* p) -> ffi::Error {
    LT_RETURN_IF_ERROR(cusparseLtStructuredDescriptorInit(&st->handle, &p->a, n, k,
                                                          row_a ? k : n, 16, type, Order(row_a),
                                                          CUSPARSELT_SPARSITY_50_PERCENT),
                       "cusparseLtStructuredDescriptorInit");
    LT_RETURN_IF_ERROR(cusparseLtDenseDescriptorInit(&st->handle, &p->b, k, m, row_b ? m : k, 16,
                                                     type, Order(row_b)),
                       "cusparseLtDenseDescriptorInit (B)");
    LT_RETURN_IF_ERROR(cusparseLtDenseDescriptorInit(&st->handle, &p->d, n, m, row_d ? m : n, 16,
                                                     type, Order(row_d)),
                       "cusparseLtDenseDescriptorInit (D)");
    LT_RETURN_IF_ERROR(cusparseLtMatmulDescriptorInit(
                           &st->handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                           CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b, &p->d, &p->d,
                           CUSPARSE_COMPUTE_32F),
                       "cusparseLtMatmulDescriptorInit");
    LT_RETURN_IF_ERROR(cusparseLtMatmulAlgSelectionInit(&st->handle, &p->alg_sel, &p->matmul,
                                                        CUSPARSELT_MATMUL_ALG_DEFAULT),
                       "cusparseLtMatmulAlgSelectionInit");
    return InitPlan(st, p, alg >= 0 ? static_cast<int>(alg) : 0);
  });
}

// Runs cusparseLtMatmulSearch for a fresh alg = -1 plan, then checks its output against
// configuration 0 once; on disagreement the plan goes back to configuration 0.
ffi::Error SearchOnce(DeviceState* st, Plan* p, const PlanKey& key, cudaDataType type,
                      const void* a, const void* b, void* d, size_t d_bytes,
                      ffi::ScratchAllocator& scratch, cudaStream_t stream) {
  float alpha = 1.0f, beta = 0.0f;
  size_t ws_bytes = p->workspace;
  auto ws = Scratch(scratch, ws_bytes);
  if (!ws.has_value()) return ws.error();
  LT_RETURN_IF_ERROR(cusparseLtMatmulSearch(&st->handle, &p->plan, &alpha, a, b, &beta, d, d, *ws,
                                            &stream, 1),
                     "cusparseLtMatmulSearch");
  Count(kSearches);
  int chosen = 0;
  LT_RETURN_IF_ERROR(cusparseLtMatmulAlgGetAttribute(&st->handle, &p->alg_sel,
                                                     CUSPARSELT_MATMUL_ALG_CONFIG_ID, &chosen,
                                                     sizeof(chosen)),
                     "cusparseLtMatmulAlgGetAttribute (CONFIG_ID)");
  LT_RETURN_IF_ERROR(cusparseLtMatmulGetWorkspace(&st->handle, &p->plan, &p->workspace),
                     "cusparseLtMatmulGetWorkspace");
  p->chosen_alg = chosen;
  p->searched = true;
  if (chosen == 0) return ffi::Error::Success();
  // Check against configuration 0 once, on these inputs.
  PlanKey ref_key = key;
  std::get<7>(ref_key) = 0;
  auto ref = GetPlan(st, ref_key, type, stream);
  if (!ref.has_value()) return ref.error();
  auto ref_out = Scratch(scratch, d_bytes);
  if (!ref_out.has_value()) return ref_out.error();
  size_t ws2_bytes = std::max((*ref)->workspace, p->workspace);
  auto ws2 = Scratch(scratch, ws2_bytes);
  if (!ws2.has_value()) return ws2.error();
  LT_RETURN_IF_ERROR(cusparseLtMatmul(&st->handle, &p->plan, &alpha, a, b, &beta, d, d, *ws2,
                                      &stream, 1),
                     "cusparseLtMatmul (searched)");
  LT_RETURN_IF_ERROR(cusparseLtMatmul(&st->handle, &(*ref)->plan, &alpha, a, b, &beta, *ref_out,
                                      *ref_out, *ws2, &stream, 1),
                     "cusparseLtMatmul (reference configuration 0)");
  std::vector<uint16_t> h_out(d_bytes / 2), h_ref(d_bytes / 2);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_out.data(), d, d_bytes, cudaMemcpyDeviceToHost, stream),
                       "cudaMemcpyAsync");
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(h_ref.data(), *ref_out, d_bytes, cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  bool bf16 = type == CUDA_R_16BF;
  double tol = bf16 ? 2e-2 : 4e-3;
  for (size_t i = 0; i < h_out.size(); ++i) {
    float x = ToFloat(h_out[i], bf16), y = ToFloat(h_ref[i], bf16);
    if (std::isnan(x) != std::isnan(y) ||
        std::fabs(x - y) > tol * (1.0 + std::fabs(y))) {
      Count(kSearchRejected);
      cusparseLtMatmulPlanDestroy(&p->plan);
      return InitPlan(st, p, 0);
    }
  }
  return ffi::Error::Success();
}

ffi::Error MatmulImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer a,
                      ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> d, int64_t n, int64_t k,
                      int64_t m, int64_t row_a, int64_t row_b, int64_t row_d, int64_t alg,
                      int64_t poison) {
  if (d->element_type() != b.element_type())
    return ffi::Error::InvalidArgument("fst_jax.cusparselt: output dtype must match B");
  if (auto e = CheckDims(b, row_b ? k : m, row_b ? m : k, "B"); !e.success()) return e;
  if (auto e = CheckDims(*d, row_d ? n : m, row_d ? m : n, "D"); !e.success()) return e;
  auto call = Prepare(b.element_type(), n, k, row_a, stream);
  if (!call.has_value()) return call.error();
  DeviceState* st = call->st;
  cudaDataType type = call->type;
  if (call->desc->compressed_size > a.size_bytes())
    return ffi::Error::InvalidArgument(
        "fst_jax.cusparselt: the compressed operand is smaller than cuSPARSELt's compressed size");
  PlanKey key{n, k, m, static_cast<int>(type), row_a ? 1 : 0, row_b ? 1 : 0, row_d ? 1 : 0, alg};
  auto plan = GetPlan(st, key, type, stream);
  if (!plan.has_value()) return plan.error();
  Plan* p = *plan;
  if (auto e = Poison(poison, d, stream); !e.success()) return e;
  if (alg < 0 && !p->searched) {
    if (auto e = SearchOnce(st, p, key, type, a.untyped_data(), b.untyped_data(),
                            d->untyped_data(), d->size_bytes(), scratch, stream);
        !e.success())
      return e;
    if (auto e = Poison(poison, d, stream); !e.success()) return e;
  }
  auto ws = Scratch(scratch, p->workspace);
  if (!ws.has_value()) return ws.error();
  float alpha = 1.0f, beta = 0.0f;
  LT_RETURN_IF_ERROR(cusparseLtMatmul(&st->handle, &p->plan, &alpha, a.untyped_data(),
                                      b.untyped_data(), &beta, d->untyped_data(),
                                      d->untyped_data(), *ws, &stream, 1),
                     "cusparseLtMatmul");
  Count(kMatmulCalls);
  return ffi::Error::Success();
}

// What both handlers bind first: the stream and XLA's scratch allocator.
auto BindStreamAndScratch() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::ScratchAllocator>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fst_cslt_compress, CompressImpl,
                              BindStreamAndScratch()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("row_a")
                                  .Attr<int64_t>("poison")
                                  .Attr<int64_t>("check"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fst_cslt_matmul, MatmulImpl,
                              BindStreamAndScratch()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("row_a")
                                  .Attr<int64_t>("row_b")
                                  .Attr<int64_t>("row_d")
                                  .Attr<int64_t>("alg")
                                  .Attr<int64_t>("poison"));

// ---------------------------------------------------------------------------------------------
// Plain C entry points for Python (ctypes): counters and a compressed-size query.

#define FST_EXPORT __attribute__((visibility("default")))

extern "C" {

FST_EXPORT int fst_cslt_num_counters() { return kNumCounters; }

FST_EXPORT void fst_cslt_counters(int64_t* out) {
  std::lock_guard<std::mutex> lock(g_counter_mu);
  for (int i = 0; i < kNumCounters; ++i) out[i] = g_counters[i];
}

// cuSPARSELt's compressed size of a [n, k] structured operand on the current device; -1 on error
// (no GPU). dtype: 0 = float16, 1 = bfloat16.
FST_EXPORT int64_t fst_cslt_compressed_size(int64_t n, int64_t k, int dtype, int row_a) {
  auto state = GetState();
  if (!state.has_value()) return -1;
  DeviceState* st = *state;
  std::lock_guard<std::mutex> lock(st->mu);
  auto desc = GetSparseDesc(st, n, k, dtype ? CUDA_R_16BF : CUDA_R_16F, row_a != 0, nullptr);
  if (!desc.has_value()) return -1;
  return static_cast<int64_t>((*desc)->compressed_size);
}

// The version of the cuSPARSELt library this process loaded (CUSPARSELT_VERSION encoding).
FST_EXPORT int fst_cslt_library_version() {
  int major = 0, minor = 0, patch = 0;
  cusparseLtGetProperty(MAJOR_VERSION, &major);
  cusparseLtGetProperty(MINOR_VERSION, &minor);
  cusparseLtGetProperty(PATCH_LEVEL, &patch);
  return major * 1000000 + minor * 100 + patch;
}

}  // extern "C"
