// llmkit-run: generate text from an llmkit AOTInductor package without Python.
//
//   llmkit-run model.pt2 -z tokenizer.model -p "prompt" -n 64 -t 0 [-k top_p] [-s seed]
//
// Loads the package's two models, prefill (any prompt length) and decode (one token), with
// torch::inductor::AOTIModelPackageLoader and gives both the same KV cache tensors, owned here.
// Encodes the prompt with SentencePiece (BOS id from the package metadata), prefills, then decodes
// one token at a time, greedily at -t 0 or by temperature and top-p.
// Prints the text as it goes, then a statistics line on stderr; --ids prints the token ids too.

#include <sentencepiece_processor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct Options {
  std::string package, tokenizer, prompt;
  int max_new_tokens = 64;
  float temperature = 0.0f, top_p = 1.0f;
  unsigned long long seed = 0;
  bool print_ids = false;
};

[[noreturn]] void fail(const std::string& message) {
  std::cerr << "llmkit-run: error: " << message << std::endl;
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options o;
  if (argc < 2) fail("usage: llmkit-run model.pt2 -z tokenizer.model -p prompt -n 64 -t 0 [-k top_p] [-s seed] [--ids]");
  o.package = argv[1];
  for (int i = 2; i < argc; i++) {
    std::string flag = argv[i];
    if (flag == "--ids") { o.print_ids = true; continue; }
    if (i + 1 >= argc) fail("flag " + flag + " needs a value");
    std::string value = argv[++i];
    if (flag == "-z") o.tokenizer = value;
    else if (flag == "-p") o.prompt = value;
    else if (flag == "-n") o.max_new_tokens = std::stoi(value);
    else if (flag == "-t") o.temperature = std::stof(value);
    else if (flag == "-k") o.top_p = std::stof(value);
    else if (flag == "-s") o.seed = std::stoull(value);
    else fail("unknown flag " + flag);
  }
  if (o.tokenizer.empty()) fail("give the SentencePiece tokenizer with -z tokenizer.model");
  if (o.temperature < 0) fail("temperature must be 0 (greedy) or more");
  return o;
}

std::vector<int> split_ints(const std::string& text) {
  std::vector<int> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoi(item));
  return out;
}

// Greedy at temperature 0; otherwise sample from the temperature-scaled distribution cut to top-p.
int sample(const torch::Tensor& logits, float temperature, float top_p, std::mt19937_64& rng) {
  if (temperature == 0.0f) return logits.argmax().item<int>();
  auto probs = torch::softmax(logits.to(torch::kFloat) / temperature, -1);
  auto [sorted, order] = probs.sort(-1, /*descending=*/true);
  auto before = sorted.cumsum(-1) - sorted;  // mass of the more likely tokens
  sorted.masked_fill_(before > top_p, 0.0);
  std::vector<float> weights(sorted.data_ptr<float>(), sorted.data_ptr<float>() + sorted.numel());
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  return order[pick(rng)].item<int>();
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(o.tokenizer).ok()) fail("cannot load SentencePiece tokenizer " + o.tokenizer);

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> prefill, decode;
  try {
    prefill = std::make_unique<torch::inductor::AOTIModelPackageLoader>(o.package, "prefill");
    decode = std::make_unique<torch::inductor::AOTIModelPackageLoader>(o.package, "decode");
  } catch (const std::exception& e) {
    fail(o.package + " is not a loadable llmkit AOTInductor package; export it again with llmkit export");
  }
  auto meta = decode->get_metadata();
  if (meta["llmkit_format"] != "3") fail(o.package + " was made by another llmkit; export it again with llmkit export");
  if (meta["tokenizer_file"].empty()) fail(o.package + " was exported without a tokenizer (random weights)");
  const int max_seq_len = std::stoi(meta["max_seq_len"]);
  const int bos = std::stoi(meta["bos_id"]);
  const std::vector<int> eos_list = split_ints(meta["eos_ids"]);
  const std::set<int> eos(eos_list.begin(), eos_list.end());
  const auto device = meta["device"] == "cuda" ? torch::kCUDA : torch::kCPU;

  // One KV cache for both models: prefill writes it, decode reads and extends it.
  const auto cache_dtype = meta["kv_cache_dtype"] == "bfloat16" ? torch::kBFloat16
                           : meta["kv_cache_dtype"] == "float16" ? torch::kHalf : torch::kFloat;
  const std::vector<int> shape = split_ints(meta["kv_cache_shape"]);
  std::unordered_map<std::string, torch::Tensor> caches;
  for (const auto& name : decode->get_constant_fqns())
    if (name.find(".kv_cache.") != std::string::npos)
      caches[name] = torch::zeros(std::vector<int64_t>(shape.begin(), shape.end()),
                                  torch::TensorOptions().dtype(cache_dtype).device(device));
  prefill->load_constants(caches, false, false, /*user_managed=*/true);
  decode->load_constants(caches, false, false, /*user_managed=*/true);

  std::vector<int> ids = {bos};
  std::vector<int> prompt_pieces;
  sp.Encode(o.prompt, &prompt_pieces);
  ids.insert(ids.end(), prompt_pieces.begin(), prompt_pieces.end());
  if (static_cast<int>(ids.size()) >= max_seq_len) fail("the prompt is longer than the context; shorten it");
  const size_t n_prompt = ids.size();
  std::mt19937_64 rng(o.seed);
  torch::NoGradGuard no_grad;

  // decode's third input: its length is how many cache positions the step attends to (all of them on a GPU)
  const auto window = torch::empty({max_seq_len}, torch::TensorOptions().dtype(torch::kUInt8).device(device));
  auto run = [&](const std::vector<int64_t>& tokens, int64_t start) {
    auto t = torch::tensor(tokens, torch::kLong).view({1, -1}).to(device);
    auto pos = torch::arange(start, start + static_cast<int64_t>(tokens.size()), torch::kLong).to(device);
    if (tokens.size() > 1) return prefill->run({t, pos})[0][0][-1].to(torch::kCPU);
    const int64_t used = device == torch::kCPU ? start + 1 : max_seq_len;
    return decode->run({t, pos, window.slice(0, 0, used)})[0][0][-1].to(torch::kCPU);
  };

  std::cout << o.prompt << std::flush;
  auto start = std::chrono::steady_clock::now();
  auto logits = run(std::vector<int64_t>(ids.begin(), ids.end()), 0);
  std::vector<int> generated;
  std::string printed;
  double first_token_s = 0;
  auto decode_start = start;
  const int limit = std::min<int>(o.max_new_tokens, max_seq_len - static_cast<int>(n_prompt));
  for (int i = 0; i < limit; i++) {
    int token = sample(logits, o.temperature, o.top_p, rng);
    if (i == 0) {
      decode_start = std::chrono::steady_clock::now();
      first_token_s = std::chrono::duration<double>(decode_start - start).count();
    }
    if (eos.count(token)) break;
    generated.push_back(token);
    // decode prompt + generated together so SentencePiece's spaces come out right; print what is new
    std::vector<int> all(ids.begin() + 1, ids.end());
    all.insert(all.end(), generated.begin(), generated.end());
    std::string text;
    sp.Decode(all, &text);
    if (text.size() > o.prompt.size() + printed.size() && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") != 0) {
      std::string fresh = text.substr(o.prompt.size() + printed.size());
      std::cout << fresh << std::flush;
      printed += fresh;
    }
    if (i + 1 < limit) logits = run({token}, static_cast<int64_t>(n_prompt + generated.size() - 1));
  }
  double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start).count();
  std::cout << std::endl;
  if (o.print_ids) {
    std::cout << "ids:";
    for (int t : generated) std::cout << " " << t;
    std::cout << std::endl;
  }
  const double decode_tps = generated.size() > 1 ? (generated.size() - 1) / decode_s : 0.0;
  fprintf(stderr, "%zu prompt + %zu new tokens | time to first token %.1f ms | prefill %.1f tok/s | decode %.1f tok/s\n",
          n_prompt, generated.size(), first_token_s * 1000, n_prompt / first_token_s, decode_tps);
  return 0;
}
