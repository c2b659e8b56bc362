// sdxl-trt's ONNX Runtime custom-op library: the operators `sdxl-trt optimize --custom-ops` puts into a graph, in the
// domain "sdxl_trt", each with a kernel for the CUDA provider (built with nvcc, SDXL_TRT_CUDA) and one for the CPU
// provider (the reference the CPU tests hold the graph rewrite to). Plain C API, no ONNX Runtime C++ wrapper: the
// library is built against one release's header and loaded by newer ones (ORT_API_VERSION is what it asks for).
//
//   BiasSplitGelu(X [..., 2H], bias [2H]) -> Y [..., H]: (X[..., :H] + bias[:H]) * gelu(X[..., H:] + bias[H:])
//   the inputs and output of one type, float or float16.

#include <onnxruntime_c_api.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#ifdef SDXL_TRT_CUDA
extern "C" int sdxl_trt_bias_split_gelu_cuda(int fp16, const void* x, const void* bias, void* y, int64_t rows,
                                              int64_t half, void* stream);
extern "C" const char* sdxl_trt_cuda_error_string(int error);
#endif

namespace {

// The API version asked for, whatever header built the library: 21 (ONNX Runtime 1.21) has everything used here,
// and every newer release serves it. The custom ops say the same version, so ONNX Runtime reads only their fields.
constexpr uint32_t kApiVersion = 21;
static_assert(ORT_API_VERSION >= kApiVersion, "build against ONNX Runtime 1.21's header or a newer one");
const OrtApi* g_api = nullptr;  // set once (std::call_once) before any kernel can run
std::once_flag g_api_once;
constexpr const char* kDomain = "sdxl_trt";

struct Op {
  OrtCustomOp base;  // first: ONNX Runtime hands back a pointer to it
  const char* provider;
  ONNXTensorElementDataType type;
};

struct Kernel {
  bool cuda;
  ONNXTensorElementDataType type;
};

OrtStatus* fail(const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("sdxl_trt.BiasSplitGelu: " + message).c_str());
}

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    OrtStatus* status_ = (expr);       \
    if (status_ != nullptr) return status_; \
  } while (0)

OrtStatus* shape_of(const OrtValue* value, std::vector<int64_t>& dims, ONNXTensorElementDataType& type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t count = 0;
  OrtStatus* status = g_api->GetDimensionsCount(info, &count);
  if (status == nullptr) {
    dims.resize(count);
    status = g_api->GetDimensions(info, dims.data(), count);
  }
  if (status == nullptr) status = g_api->GetTensorElementType(info, &type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

// fp16 <-> fp32 on the CPU (round to nearest even), without a compiler's half type
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while ((mantissa & 0x400) == 0) { mantissa <<= 1; ++shift; }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
  const uint32_t abs = bits & 0x7fffffff;
  if (abs > 0x7f800000) return sign | 0x7e00;                 // NaN
  if (abs >= 0x477ff000) return sign | 0x7c00;                // rounds to ±inf (or is inf)
  if (abs < 0x38800000) {                                    // fp16 subnormal or zero
    if (abs < 0x33000000) return sign;                       // below half the smallest subnormal
    const uint32_t mantissa = (abs & 0x7fffff) | 0x800000;
    const int shift = 126 - int(abs >> 23);                  // 14..24
    const uint32_t kept = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    return sign | uint16_t(kept + (rest > halfway || (rest == halfway && (kept & 1))));
  }
  const uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);  // round to nearest even at bit 13
  return sign | uint16_t((rounded - 0x38000000) >> 13);
}

float gelu_erf(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752440f)); }

template <typename Load, typename Store>
void compute_cpu(Load load, Store store, int64_t rows, int64_t half) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < half; ++j) {
      const float a = load(0, r * 2 * half + j) + load(1, j);
      const float g = load(0, r * 2 * half + half + j) + load(1, half + j);
      store(r * half + j, a * gelu_erf(g));
    }
  }
}

OrtStatus* ORT_API_CALL compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(op_kernel);
  const OrtValue* x = nullptr;
  const OrtValue* bias = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 0, &x));
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 1, &bias));
  std::vector<int64_t> dims, bias_dims;
  ONNXTensorElementDataType type, bias_type;
  RETURN_IF_ERROR(shape_of(x, dims, type));
  RETURN_IF_ERROR(shape_of(bias, bias_dims, bias_type));
  if (dims.empty()) return fail("the input has no dimensions");
  const int64_t width = dims.back();
  if (width % 2 != 0) return fail("the input's last dimension (" + std::to_string(width) + ") is odd");
  if (bias_dims.size() != 1 || bias_dims[0] != width)
    return fail("the bias must be one-dimensional, as long as the input's last dimension (" +
                std::to_string(width) + ")");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  const int64_t half = width / 2;
  dims.back() = half;
  OrtValue* y = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y));
  void* x_data = nullptr;
  void* bias_data = nullptr;
  void* y_data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(x), &x_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(bias), &bias_data));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(y, &y_data));
  const bool fp16 = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (kernel.cuda) {
#ifdef SDXL_TRT_CUDA
    void* stream = nullptr;
    RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream));
    const int error = sdxl_trt_bias_split_gelu_cuda(fp16, x_data, bias_data, y_data, rows, half, stream);
    if (error != 0) return g_api->CreateStatus(ORT_EP_FAIL, (std::string("sdxl_trt.BiasSplitGelu: CUDA launch failed: ") +
                                                              sdxl_trt_cuda_error_string(error)).c_str());
    return nullptr;
#else
    return fail("this library was built without CUDA");
#endif
  }
  if (fp16) {
    const uint16_t* in[2] = {static_cast<const uint16_t*>(x_data), static_cast<const uint16_t*>(bias_data)};
    uint16_t* out = static_cast<uint16_t*>(y_data);
    compute_cpu([&](int k, int64_t i) { return half_to_float(in[k][i]); },
                [&](int64_t i, float v) { out[i] = float_to_half(v); }, rows, half);
  } else {
    const float* in[2] = {static_cast<const float*>(x_data), static_cast<const float*>(bias_data)};
    float* out = static_cast<float*>(y_data);
    compute_cpu([&](int k, int64_t i) { return in[k][i]; }, [&](int64_t i, float v) { out[i] = v; }, rows, half);
  }
  return nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  const Op& self = *reinterpret_cast<const Op*>(op);
  *kernel = new Kernel{std::strcmp(self.provider, "CUDAExecutionProvider") == 0, self.type};
  return nullptr;
}

const char* fresh_symbol() {
  // kept for the library's life: ONNX Runtime may hold on to the pointer
  static std::mutex lock;
  static std::deque<std::string> names;
  std::lock_guard<std::mutex> hold(lock);
  names.push_back("sdxl_trt_dim_" + std::to_string(names.size()));
  return names.back().c_str();
}

OrtStatus* ORT_API_CALL infer_shape(const OrtCustomOp*, OrtShapeInferContext* context) {
  // the output: the input's type and dimensions (their symbols too), the last one halved where it is known
  OrtTensorTypeAndShapeInfo* in = nullptr;  // not ours to release (below)
  RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(context, 0, &in));
  OrtTensorTypeAndShapeInfo* out = nullptr;
  size_t count = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  std::vector<const char*> symbols;
  OrtStatus* status = g_api->GetDimensionsCount(in, &count);
  if (status == nullptr) {
    dims.resize(count);
    symbols.resize(count);
    status = g_api->GetDimensions(in, dims.data(), count);
  }
  // an input of unknown rank (no shape at all: the rank reads as 0) says nothing of the output's: left unset, as
  // declaring it would make a scalar of it and fail the next node's shape inference
  if (status == nullptr && count == 0) return nullptr;
  if (status == nullptr) status = g_api->GetSymbolicDimensions(in, symbols.data(), count);
  if (status == nullptr) status = g_api->GetTensorElementType(in, &type);
  if (status == nullptr) {  // an odd width: unknown here, refused by the kernel when it runs (ONNX Runtime 1.31/1.32
    dims.back() = dims.back() >= 0 && dims.back() % 2 == 0 ? dims.back() / 2 : -1;  // ignore a status from here)
    symbols.back() = "";
  }
  for (size_t i = 0; status == nullptr && i < count; ++i) {
    // a dimension neither known nor named gets a name of its own (recorded as the value -1, ONNX Runtime would warn
    // at every run that the output's shape differs from the model's; left unset, the output would have rank 0 and
    // the next node's shape inference fails: ONNX Runtime 1.31): unique, so no two tensors are taken as one size
    if (dims[i] < 0 && (symbols[i] == nullptr || symbols[i][0] == '\0')) symbols[i] = fresh_symbol();
  }
  if (status == nullptr) status = g_api->CreateTensorTypeAndShapeInfo(&out);
  if (status == nullptr) status = g_api->SetTensorElementType(out, type);
  if (status == nullptr) status = g_api->SetDimensions(out, dims.data(), count);
  if (status == nullptr && count > 0) status = g_api->SetSymbolicDimensions(out, symbols.data(), count);
  if (status == nullptr) status = g_api->ShapeInferContext_SetOutputTypeShape(context, 0, out);
  if (out != nullptr) g_api->ReleaseTensorTypeAndShapeInfo(out);
  // `in` is not released: ONNX Runtime 1.32 hands out the context's own record (releasing it here freed it twice
  // when the session was made); where a release owes it to us, it is a few bytes once per node at session creation
  return status;
}

Op make_op(const char* provider, ONNXTensorElementDataType type) {
  Op op{};
  op.base.version = kApiVersion;
  op.base.GetName = [](const OrtCustomOp*) { return "BiasSplitGelu"; };
  op.base.GetExecutionProviderType = [](const OrtCustomOp* o) { return reinterpret_cast<const Op*>(o)->provider; };
  op.base.GetInputType = [](const OrtCustomOp* o, size_t) { return reinterpret_cast<const Op*>(o)->type; };
  op.base.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 2; };
  op.base.GetOutputType = [](const OrtCustomOp* o, size_t) { return reinterpret_cast<const Op*>(o)->type; };
  op.base.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.base.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.base.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.base.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.base.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.base.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.base.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.base.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.base.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.base.CreateKernelV2 = create_kernel;
  op.base.KernelComputeV2 = compute;
  op.base.InferOutputShapeFn = infer_shape;
  op.base.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.base.GetEndVersion = [](const OrtCustomOp*) { return 1; };
  op.provider = provider;
  op.type = type;
  return op;
}

Op g_ops[] = {
    make_op("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
    make_op("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
#ifdef SDXL_TRT_CUDA
    make_op("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
    make_op("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
#endif
};

}  // namespace

// What ONNX Runtime calls for SessionOptions.register_custom_ops_library. A domain is made for each session
// options and kept for the life of the process (sessions made from those options use it).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  std::call_once(g_api_once, [api_base] { g_api = api_base->GetApi(kApiVersion); });
  if (g_api == nullptr) {  // an ONNX Runtime older than 1.21: say so with the API every release has
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "sdxl_trt custom ops need ONNX Runtime 1.21 or newer");
  }
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain(kDomain, &domain));
  for (Op& op : g_ops) RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &op.base));
  return g_api->AddCustomOpDomain(options, domain);
}

// which kernels this build has (the Python side checks a library before recording it)
extern "C" __attribute__((visibility("default"))) int sdxl_trt_ops_has_cuda() {
#ifdef SDXL_TRT_CUDA
  return 1;
#else
  return 0;
#endif
}
