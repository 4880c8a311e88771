// SentencePiece BPE encoding, exactly as sentencepiece's own encoder (src/normalizer.cc, src/bpe_model.cc and
// PopulateSentencePieceText in src/sentencepiece_processor.cc of release 0.2.3, the one pyproject.toml requires;
// the source of February 2025 still gave a control piece's id for text spelling it, see 3.), for the Baichuan
// tokenizers.
//
// A CPython extension with no other dependency, built and loaded by baichuan/native_bpe.py. It reads the
// serialized ModelProto itself (the protobuf wire format), so what it encodes with is exactly the model file.
//
// The steps, each as sentencepiece takes them:
// 1. Normalisation. At each position, the longest user-defined piece starting there is copied verbatim;
//    otherwise the longest rule of the precompiled charsmap (a Darts double array; only its first 32 matches
//    count) is applied; otherwise one UTF-8 character is copied (a malformed byte becomes U+FFFD). Spaces become
//    U+2581 `▁`; a dummy `▁` goes in front (or behind, with treat_whitespace_as_suffix); with
//    remove_extra_whitespaces, leading, trailing and repeated spaces go. Every normalised byte remembers the
//    input byte it came from (norm_to_orig), for offsets.
// 2. BPE. The normalised text is cut into symbols: the longest user-defined piece at each position (frozen: it
//    never merges) or one character. Then, repeatedly, the adjacent pair whose concatenation is the
//    best-scoring piece (normal, user-defined or unused) is merged; equal scores go to the left-most pair.
//    Pieces of type UNUSED that come out are split back into the two symbols they were last formed from.
// 3. Ids. A symbol's id is its piece's where that is a normal, user-defined or unused piece, else unk: text that
//    spells a control or byte piece is unknown (0.2.3 looks symbols up past its reserved pieces, which also
//    never merge). An unused piece never formed from a pair is unknown too. With byte_fallback an unknown
//    symbol becomes its UTF-8 bytes' pieces; without it, a run of unknown symbols is one unk.
//
// The speed comes from doing the same work with less: merges are found in a hash table keyed by the pair of
// symbol ids (one 64-bit key, open addressing) instead of by string; the candidate pairs are a binary heap; and,
// when no piece holds a `▁` after its first byte (true of every Baichuan vocabulary), no merge can cross the
// start of a `▁` or a frozen symbol, so the text is cut there into words whose results do not depend on each
// other and short words are served from a cache. Buffers are kept between calls. The batch call releases the
// GIL and shares the texts among threads.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

enum PieceType : uint8_t { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6 };
constexpr int kBpeModel = 2;
constexpr int kMaxNormalizerResults = 32;  // Normalizer::kMaxTrieResultsSize
constexpr int kMaxResegmentDepth = 100;     // kMaxBpeResegmentDepth
constexpr size_t kCacheMaxWordBytes = 32;
constexpr size_t kCacheSlots = 1 << 15;
const char kSpace[] = "\xe2\x96\x81";  // U+2581

inline size_t one_char_len(const char* s) {  // string_util::OneCharLen
  return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[(static_cast<uint8_t>(*s)) >> 4];
}

// string_util::DecodeUTF8's notion of a valid character: the length of the one at s, 0 if malformed.
size_t valid_char_len(const uint8_t* s, size_t n) {
  const uint8_t c = s[0];
  if (c < 0x80) return 1;
  auto cont = [&](size_t i) { return i < n && (s[i] & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    const uint32_t cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    const uint32_t cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    if (cp < 0x10000 || cp > 0x10FFFF) return 0;
    return 4;
  }
  return 0;
}

inline uint64_t hash_bytes(const char* s, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, s, 8);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, s, n);
  h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
  return h ^ (h >> 32);
}

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Protobuf wire format: just what a ModelProto needs.

struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  bool ok = true;

  bool more() const { return ok && p < end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) break;
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (b < 0x80) return v;
    }
    ok = false;
    return 0;
  }
  // Reads one field: its number, wire type, and either its varint/fixed value or its bytes.
  bool field(int* number, int* wire, uint64_t* value, std::string_view* bytes) {
    const uint64_t key = varint();
    *number = static_cast<int>(key >> 3);
    *wire = static_cast<int>(key & 7);
    switch (*wire) {
      case 0: *value = varint(); break;
      case 1:
        if (end - p < 8) { ok = false; break; }
        std::memcpy(value, p, 8);
        p += 8;
        break;
      case 5: {
        if (end - p < 4) { ok = false; break; }
        uint32_t v;
        std::memcpy(&v, p, 4);
        *value = v;
        p += 4;
        break;
      }
      case 2: {
        const uint64_t n = varint();
        if (!ok || n > static_cast<uint64_t>(end - p)) { ok = false; break; }
        *bytes = std::string_view(reinterpret_cast<const char*>(p), n);
        p += n;
        break;
      }
      default: ok = false;
    }
    return ok;
  }
};

Wire wire_of(std::string_view s) {
  return Wire{reinterpret_cast<const uint8_t*>(s.data()), reinterpret_cast<const uint8_t*>(s.data()) + s.size()};
}

// ---------------------------------------------------------------------------------------------------------------
// Hash tables.

// string -> int32, open addressing; keys point into storage that outlives the table.
class StrMap {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }
  bool insert(std::string_view key, int32_t value) {  // false if present
    for (size_t i = hash_bytes(key.data(), key.size()) & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.value < 0) {
        s = Slot{key.data(), static_cast<uint32_t>(key.size()), value};
        return true;
      }
      if (s.size == key.size() && std::memcmp(s.data, key.data(), key.size()) == 0) return false;
    }
  }
  int32_t find(const char* data, size_t size) const {
    if (slots_.empty()) return -1;
    for (size_t i = hash_bytes(data, size) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.value < 0) return -1;
      if (s.size == size && std::memcmp(s.data, data, size) == 0) return s.value;
    }
  }

 private:
  struct Slot {
    const char* data = nullptr;
    uint32_t size = 0;
    int32_t value = -1;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// (left symbol, right symbol) -> merged piece, in one 64-bit slot (20 bits each: one cache miss a lookup).
class PairMap {
 public:
  static constexpr int kBits = 20;
  static constexpr uint32_t kMaxKey = (1u << kBits) - 2;
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    slots_.assign(cap, kEmpty);
    mask_ = cap - 1;
  }
  static uint64_t key(uint32_t left, uint32_t right) { return (static_cast<uint64_t>(left) << kBits) | right; }
  void insert(uint64_t k, uint32_t value) {
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i] == kEmpty || (slots_[i] >> kBits) == k) {
        slots_[i] = (k << kBits) | value;
        return;
      }
    }
  }
  // The value, or -1.
  int32_t find(uint64_t k) const {
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      const uint64_t slot = slots_[i];
      if ((slot >> kBits) == k) return static_cast<int32_t>(slot & ((1u << kBits) - 1));
      if (slot == kEmpty) return -1;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ull;  // its key part (2^44 - 1) is no pair of keys up to kMaxKey
  std::vector<uint64_t> slots_;
  size_t mask_ = 0;
};

// A byte trie of the user-defined pieces: the longest one that is a prefix of the text (PrefixMatcher).
class Trie {
 public:
  void add(std::string_view word, int32_t id) {
    int node = 0;
    for (char c : word) {
      const uint64_t k = (static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(c);
      auto it = edges_.find(k);
      if (it == edges_.end()) {
        it = edges_.emplace(k, static_cast<int>(terminal_.size())).first;
        terminal_.push_back(-1);
      }
      node = it->second;
    }
    terminal_[node] = id;
    starts_[static_cast<uint8_t>(word[0])] = true;
    empty_ = false;
  }
  bool finish() {
    if (terminal_.size() > PairMap::kMaxKey) return false;
    table_.reserve(edges_.size());
    for (const auto& [k, v] : edges_) table_.insert(k, static_cast<uint32_t>(v));
    return true;
  }
  // Length of the longest match at s (0: none); `id` gets its piece.
  size_t match(const char* s, size_t n, int32_t* id = nullptr) const {
    if (empty_ || !starts_[static_cast<uint8_t>(*s)]) return 0;
    size_t best = 0;
    int node = 0;
    for (size_t i = 0; i < n; ++i) {
      node = table_.find((static_cast<uint64_t>(node) << 8) | static_cast<uint8_t>(s[i]));
      if (node < 0) break;
      if (terminal_[node] >= 0) {
        best = i + 1;
        if (id != nullptr) *id = terminal_[node];
      }
    }
    return best;
  }
  bool empty() const { return empty_; }
  bool may_start(uint8_t byte) const { return starts_[byte]; }

 private:
  std::unordered_map<uint64_t, int> edges_;
  PairMap table_;
  std::vector<int32_t> terminal_ = {-1};  // the piece a node ends, or -1
  bool starts_[256] = {};
  bool empty_ = true;
};

// The precompiled charsmap: a Darts-clone double array over the rules' sources, whose values index the
// NUL-terminated replacement strings that follow it.
class CharsMap {
 public:
  bool load(std::string_view blob) {
    if (blob.empty()) return true;
    uint32_t size = 0;
    if (blob.size() <= 4) return false;
    std::memcpy(&size, blob.data(), 4);
    if (size >= blob.size() || size % 4) return false;
    units_.resize(size / 4);
    std::memcpy(units_.data(), blob.data() + 4, size);
    replacements_.assign(blob.data() + 4 + size, blob.size() - 4 - size);
    replacements_.push_back('\0');
    return !units_.empty();
  }
  bool empty() const { return units_.empty(); }
  // Whether some rule's source starts with these bytes (the trie has a node for them).
  bool reaches(const char* s, size_t n) const {
    if (units_.empty()) return false;
    size_t id = offset(units_[0]);
    for (size_t i = 0; i < n; ++i) {
      id ^= static_cast<uint8_t>(s[i]);
      if (id >= units_.size()) return false;
      const uint32_t unit = units_[id];
      if ((unit & ((1u << 31) | 0xFF)) != static_cast<uint8_t>(s[i])) return false;
      id ^= offset(unit);
    }
    return true;
  }
  // Longest rule among Darts' first kMaxNormalizerResults matches at s: its length, and its replacement.
  size_t longest(const char* s, size_t n, std::string_view* out) const {
    size_t found = 0, length = 0;
    uint32_t value = 0;
    size_t id = 0;
    uint32_t unit = units_[0];
    id ^= offset(unit);
    for (size_t i = 0; i < n; ++i) {
      id ^= static_cast<uint8_t>(s[i]);
      if (id >= units_.size()) break;
      unit = units_[id];
      if ((unit & ((1u << 31) | 0xFF)) != static_cast<uint8_t>(s[i])) break;
      id ^= offset(unit);
      if (id >= units_.size()) break;
      if ((unit >> 8) & 1) {
        if (found < kMaxNormalizerResults) {
          length = i + 1;
          value = units_[id] & ((1u << 31) - 1);
        }
        ++found;
      }
    }
    if (length && value < replacements_.size()) *out = std::string_view(replacements_.data() + value);
    else length = 0;
    return length;
  }

 private:
  static uint32_t offset(uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); }
  std::vector<uint32_t> units_;
  std::string replacements_;
};

// ---------------------------------------------------------------------------------------------------------------

struct Piece {  // one BPE symbol after merging: its id (or -1: look it up by text) and its normalised bytes
  int32_t id;
  uint32_t size;
};

// Work space of one thread: kept between calls so that encoding allocates nothing once warm.
struct Scratch {
  std::string normalized;
  std::vector<uint32_t> norm_to_orig;
  struct Symbol {
    int32_t prev, next, key;
    uint32_t start, size;
    bool freeze;
  };
  struct Candidate {
    int32_t score;  // the float's bits
    int32_t left, right, piece;
    uint32_t size;
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> agenda;
  std::vector<Piece> pieces;      // the segmentation of the whole text
  std::vector<int32_t> ids;       // the output
  std::vector<int64_t> offsets;   // begin, end byte pairs of the output
  // Word cache: open addressing over `slots`; keys and results live in the two arenas.
  struct Slot {
    uint64_t hash;
    uint32_t key_at, key_size, value_at, value_size;
  };
  std::vector<Slot> slots;
  std::string key_arena;
  std::vector<Piece> value_arena;
  size_t cached = 0;
};

class Model {
 public:
  std::string error;

  bool load(std::string_view proto) {
    proto_.assign(proto.data(), proto.size());  // pieces point into this copy
    std::string_view trainer, normalizer;
    bool has_trainer = false, has_normalizer = false;
    Wire w = wire_of(proto_);
    int number, wt;
    uint64_t value;
    std::string_view bytes;
    while (w.more() && w.field(&number, &wt, &value, &bytes)) {
      if (number == 1 && wt == 2) {
        std::string_view piece;
        float score = 0.f;
        int type = NORMAL;
        Wire p = wire_of(bytes);
        while (p.more() && p.field(&number, &wt, &value, &bytes)) {
          if (number == 1 && wt == 2) piece = bytes;
          else if (number == 2 && wt == 5) {
            const uint32_t bits = static_cast<uint32_t>(value);
            std::memcpy(&score, &bits, 4);
          } else if (number == 3 && wt == 0) type = static_cast<int>(value);
        }
        if (!p.ok) return fail("a piece does not parse");
        pieces_.push_back(piece);
        scores_.push_back(score);
        types_.push_back(static_cast<uint8_t>(type));
      } else if (number == 2 && wt == 2) {
        trainer = bytes;
        has_trainer = true;
      } else if (number == 3 && wt == 2) {
        normalizer = bytes;
        has_normalizer = true;
      }
    }
    if (!w.ok) return fail("not a SentencePiece model");
    int model_type = 1;  // UNIGRAM, the proto's default
    if (has_trainer) {
      Wire t = wire_of(trainer);
      while (t.more() && t.field(&number, &wt, &value, &bytes)) {
        if (number == 3 && wt == 0) model_type = static_cast<int>(value);
        else if (number == 24 && wt == 0) whitespace_as_suffix_ = value != 0;
        else if (number == 35 && wt == 0) byte_fallback_ = value != 0;
      }
    }
    if (model_type != kBpeModel) return fail("not a BPE model");
    std::string_view charsmap;
    if (has_normalizer) {
      Wire n = wire_of(normalizer);
      while (n.more() && n.field(&number, &wt, &value, &bytes)) {
        if (number == 2 && wt == 2) charsmap = bytes;
        else if (number == 3 && wt == 0) add_dummy_prefix_ = value != 0;
        else if (number == 4 && wt == 0) remove_extra_whitespaces_ = value != 0;
        else if (number == 5 && wt == 0) escape_whitespaces_ = value != 0;
      }
    }
    if (!charsmap_.load(charsmap)) return fail("the precompiled charsmap is broken");
    return build();
  }

  // Encodes one UTF-8 text into scratch.ids (and, with offsets, scratch.offsets as input byte offsets).
  void encode(const char* text, size_t size, bool offsets, Scratch& s) const {
    s.ids.clear();
    s.offsets.clear();
    normalize(text, size, offsets, s);
    segment(s);
    emit(offsets, s);
  }

  bool splits_words() const { return split_words_; }

 private:
  std::string proto_;
  std::vector<std::string_view> pieces_;
  std::vector<float> scores_;
  std::vector<int32_t> score_bits_;  // the scores' bit patterns, as sentencepiece compares them
  std::vector<uint8_t> types_;
  bool byte_fallback_ = false, whitespace_as_suffix_ = false;
  bool add_dummy_prefix_ = true, remove_extra_whitespaces_ = true, escape_whitespaces_ = true;
  CharsMap charsmap_;
  Trie user_;
  StrMap pieces_map_;    // normal, user-defined and unused pieces (ModelInterface::pieces_)
  StrMap reserved_map_;  // the others (reserved_id_map_)
  int32_t unk_id_ = -1;
  int32_t byte_ids_[256];
  bool has_unused_ = false, split_words_ = false, cut_every_space_ = false;
  // Symbol keys: a piece of pieces_map_ is its id; a character that is no such piece but occurs in one gets a
  // key from pieces_.size() up, so that merges into that piece are found. Other characters have no key.
  std::vector<int32_t> bmp_keys_;           // by code point, for characters of 1-3 bytes
  StrMap long_char_keys_;                   // 4-byte characters
  std::deque<std::string> virtual_chars_;   // text of the keys from pieces_.size() up (a deque: they stay put)
  std::vector<int32_t> key_ids_;            // key -> output id: its piece, or unk for a character that is none
  PairMap merges_;
  std::vector<bool> left_part_, right_part_;  // whether a key is the left (right) part of any merge
  std::vector<bool> plain_;                   // by code point: see plain_char

  bool fail(const char* message) {
    error = message;
    return false;
  }

  static bool is_piece_type(uint8_t t) { return t == NORMAL || t == USER_DEFINED || t == UNUSED; }

  int32_t piece_to_id(const char* data, size_t size) const {
    int32_t id = reserved_map_.find(data, size);
    if (id >= 0) return id;
    id = pieces_map_.find(data, size);
    return id >= 0 ? id : unk_id_;
  }

  // 1-3 byte characters by code point (valid UTF-8 only), others by hash.
  static int32_t bmp_index(const char* s, size_t n) {
    const uint8_t* u = reinterpret_cast<const uint8_t*>(s);
    if (n == 1 && u[0] < 0x80) return u[0];
    if (n == 2 && (u[0] & 0xE0) == 0xC0 && (u[1] & 0xC0) == 0x80) return ((u[0] & 0x1F) << 6) | (u[1] & 0x3F);
    if (n == 3 && (u[0] & 0xF0) == 0xE0 && (u[1] & 0xC0) == 0x80 && (u[2] & 0xC0) == 0x80) {
      const int32_t cp = ((u[0] & 0x0F) << 12) | ((u[1] & 0x3F) << 6) | (u[2] & 0x3F);
      if (cp >= 0x800) return cp;
    }
    return -1;
  }

  int32_t char_key(const char* s, size_t n) const {
    const int32_t i = bmp_index(s, n);
    if (i >= 0 && !(n == 2 && i < 0x80)) return bmp_keys_[i];
    return long_char_keys_.find(s, n);
  }

  int32_t key_of(std::string_view text) const {
    if (one_char_len(text.data()) == text.size()) return char_key(text.data(), text.size());
    return pieces_map_.find(text.data(), text.size());
  }

  bool build() {
    const size_t n = pieces_.size();
    size_t normal = 0;
    for (uint8_t t : types_) normal += is_piece_type(t);
    pieces_map_.reserve(normal);
    reserved_map_.reserve(n - normal + 1);
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
    for (size_t i = 0; i < n; ++i) {
      const auto piece = pieces_[i];
      if (piece.empty()) return fail("piece must not be empty");
      if (!(is_piece_type(types_[i]) ? pieces_map_ : reserved_map_).insert(piece, static_cast<int32_t>(i)))
        return fail("a piece is defined twice");
      if (types_[i] == USER_DEFINED) user_.add(piece, static_cast<int32_t>(i));
      if (types_[i] == UNUSED) has_unused_ = true;
      if (types_[i] == UNKNOWN) {
        if (unk_id_ >= 0) return fail("unk is defined twice");
        unk_id_ = static_cast<int32_t>(i);
      }
    }
    if (unk_id_ < 0) return fail("no unk piece");
    score_bits_.resize(n);
    std::memcpy(score_bits_.data(), scores_.data(), n * sizeof(float));
    if (!user_.finish()) return fail("too many user-defined pieces");
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      byte_ids_[b] = piece_to_id(name, 6);
    }
    // Word cuts. No merge and no user-defined piece can cross the start of a `▁` that no piece holds after its
    // first byte: where no piece holds one after anything, the text is cut before every `▁` (Baichuan's
    // vocabularies); where pieces hold `▁` only after `▁` (whitespace-only pieces such as `▁▁▁▁`, which
    // `train-tokenizer` allows), before each `▁` that follows something else. Never with unused pieces: their
    // resegmentation remembers pairs across the whole text.
    bool every = true, after_other = true;
    for (size_t i = 0; i < n; ++i) {
      if (!is_piece_type(types_[i])) continue;
      const auto piece = pieces_[i];
      if (piece.find(' ') != std::string_view::npos) every = after_other = false;
      for (size_t at = piece.find(kSpace, 1); at != std::string_view::npos; at = piece.find(kSpace, at + 1)) {
        every = false;
        if (at < 3 || piece.substr(at - 3, 3) != kSpace) after_other = false;
      }
    }
    split_words_ = escape_whitespaces_ && !has_unused_ && (every || after_other);
    cut_every_space_ = every;
    // Symbol keys.
    bmp_keys_.assign(0x10000, -1);
    long_char_keys_.reserve(n);
    auto add_char = [&](std::string_view c, int32_t key) {
      const int32_t i = bmp_index(c.data(), c.size());
      if (i >= 0 && !(c.size() == 2 && i < 0x80)) {
        if (bmp_keys_[i] < 0) bmp_keys_[i] = key;
      } else {
        long_char_keys_.insert(c, key);
      }
    };
    for (size_t i = 0; i < n; ++i) {
      if (is_piece_type(types_[i]) && one_char_len(pieces_[i].data()) == pieces_[i].size())
        add_char(pieces_[i], static_cast<int32_t>(i));
    }
    size_t pairs = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!is_piece_type(types_[i])) continue;
      const auto piece = pieces_[i];
      for (size_t at = 0; at < piece.size();) {
        const size_t len = std::min(one_char_len(piece.data() + at), piece.size() - at);
        const auto c = piece.substr(at, len);
        if (char_key(c.data(), c.size()) < 0) {
          virtual_chars_.emplace_back(c);
          add_char(virtual_chars_.back(), static_cast<int32_t>(n + virtual_chars_.size() - 1));
        }
        at += len;
        ++pairs;
      }
    }
    // A symbol is its piece where that is normal, user-defined or unused (keys below n are); any other text,
    // even that of a control or byte piece, is unknown (PieceToIdNoReserved, then IsReservedId).
    key_ids_.resize(n + virtual_chars_.size(), unk_id_);
    for (size_t i = 0; i < n; ++i) key_ids_[i] = static_cast<int32_t>(i);
    plain_.assign(0x10000, false);
    for (uint32_t cp = 0; cp < 0x10000; ++cp) {
      if (cp == ' ' || (cp >= 0xD800 && cp <= 0xDFFF)) continue;
      char c[3];
      size_t len = 1;
      if (cp < 0x80) {
        c[0] = static_cast<char>(cp);
      } else if (cp < 0x800) {
        c[0] = static_cast<char>(0xC0 | (cp >> 6));
        c[1] = static_cast<char>(0x80 | (cp & 0x3F));
        len = 2;
      } else {
        c[0] = static_cast<char>(0xE0 | (cp >> 12));
        c[1] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        c[2] = static_cast<char>(0x80 | (cp & 0x3F));
        len = 3;
      }
      plain_[cp] = !user_.may_start(static_cast<uint8_t>(c[0])) && !charsmap_.reaches(c, len);
    }
    if (key_ids_.size() > PairMap::kMaxKey) return fail("too many pieces");
    // Merges: every split of a piece, at a character boundary, into two symbols that have keys.
    merges_.reserve(pairs);
    left_part_.assign(key_ids_.size(), false);
    right_part_.assign(key_ids_.size(), false);
    for (size_t i = 0; i < n; ++i) {
      if (!is_piece_type(types_[i])) continue;
      const auto piece = pieces_[i];
      for (size_t at = one_char_len(piece.data()); at < piece.size(); at += one_char_len(piece.data() + at)) {
        const int32_t left = key_of(piece.substr(0, at)), right = key_of(piece.substr(at));
        if (left >= 0 && right >= 0) {
          merges_.insert(PairMap::key(left, right), static_cast<uint32_t>(i));
          left_part_[left] = right_part_[right] = true;
        }
      }
    }
    return true;
  }

  // --- 1. normalisation (Normalizer::Normalize)

  // The length of the character at s if normalising leaves it as it is (valid UTF-8 of 1-3 bytes, not a space,
  // starting no user-defined piece and no charsmap rule), else 0: most characters, found in one bit.
  size_t plain_char(const char* s, size_t n) const {
    const size_t len = std::min(one_char_len(s), n);
    const int32_t cp = bmp_index(s, len);
    return cp >= 0 && plain_[cp] && !(len == 2 && cp < 0x80) ? len : 0;
  }

  // The normalised form of the text's prefix, and how many input bytes it consumes (NormalizePrefix).
  std::pair<std::string_view, size_t> normalize_prefix(const char* s, size_t n) const {
    if (const size_t m = user_.match(s, n)) return {std::string_view(s, m), m};
    std::string_view out;
    if (!charsmap_.empty()) {
      if (const size_t m = charsmap_.longest(s, n, &out)) return {out, m};
    }
    const size_t len = valid_char_len(reinterpret_cast<const uint8_t*>(s), n);
    if (len == 0) return {std::string_view("\xEF\xBF\xBD", 3), 1};
    return {std::string_view(s, len), len};
  }

  void normalize(const char* text, size_t size, bool offsets, Scratch& s) const {
    std::string& out = s.normalized;
    std::vector<uint32_t>& map = s.norm_to_orig;
    out.clear();
    map.clear();
    if (size == 0) return;
    size_t consumed = 0;
    if (remove_extra_whitespaces_) {
      while (consumed < size) {
        const auto p = normalize_prefix(text + consumed, size - consumed);
        if (p.first != " ") break;
        consumed += p.second;
      }
      if (consumed == size) return;
    }
    auto add_ws = [&] {
      if (escape_whitespaces_) {
        out.append(kSpace, 3);
        if (offsets) map.insert(map.end(), 3, static_cast<uint32_t>(consumed));
      } else {
        out.push_back(' ');
        if (offsets) map.push_back(static_cast<uint32_t>(consumed));
      }
    };
    if (!whitespace_as_suffix_ && add_dummy_prefix_) add_ws();
    bool prev_space = remove_extra_whitespaces_;
    while (consumed < size) {
      if (const size_t len = plain_char(text + consumed, size - consumed)) {  // copied as it is
        out.append(text + consumed, len);
        if (offsets) map.insert(map.end(), len, static_cast<uint32_t>(consumed));
        consumed += len;
        prev_space = false;
        continue;
      }
      auto [piece, used] = normalize_prefix(text + consumed, size - consumed);
      while (prev_space && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
      if (!piece.empty() && (!escape_whitespaces_ || std::memchr(piece.data(), ' ', piece.size()) == nullptr)) {
        out.append(piece.data(), piece.size());
        if (offsets) map.insert(map.end(), piece.size(), static_cast<uint32_t>(consumed));
        prev_space = piece.back() == ' ';
      } else if (!piece.empty()) {
        for (char c : piece) {
          if (escape_whitespaces_ && c == ' ') {
            out.append(kSpace, 3);
            if (offsets) map.insert(map.end(), 3, static_cast<uint32_t>(consumed));
          } else {
            out.push_back(c);
            if (offsets) map.push_back(static_cast<uint32_t>(consumed));
          }
        }
        prev_space = piece.back() == ' ';
      }
      consumed += used;
      if (!remove_extra_whitespaces_) prev_space = false;
    }
    if (remove_extra_whitespaces_) {
      const std::string_view space = escape_whitespaces_ ? std::string_view(kSpace, 3) : std::string_view(" ");
      while (out.size() >= space.size() && std::string_view(out).substr(out.size() - space.size()) == space) {
        const size_t length = out.size() - space.size();
        if (offsets) {
          consumed = map[length];
          map.resize(length);
        } else {
          consumed = 0;  // only offsets read it
        }
        out.resize(length);
      }
    }
    if (whitespace_as_suffix_ && add_dummy_prefix_) add_ws();
    if (offsets) map.push_back(static_cast<uint32_t>(consumed));
  }

  // --- 2. BPE (Model::SampleEncode without sampling)

  void segment(Scratch& s) const {
    s.pieces.clear();
    const std::string& text = s.normalized;
    if (text.empty()) return;
    if (!split_words_) {
      bpe(text.data(), text.size(), true, s);
      return;
    }
    const char* data = text.data();
    const size_t size = text.size();
    size_t word = 0, at = 0;
    bool after_space = false;
    while (at < size) {
      int32_t frozen;
      if (const size_t m = user_.match(data + at, size - at, &frozen)) {  // frozen: its own piece
        if (at > word) cached_bpe(data + word, at - word, s);
        s.pieces.push_back(Piece{key_ids_[frozen], static_cast<uint32_t>(m)});
        at += m;
        word = at;
        after_space = false;
        continue;
      }
      const bool space = size - at >= 3 && std::memcmp(data + at, kSpace, 3) == 0;
      if (space && at > word && (cut_every_space_ || !after_space)) {
        cached_bpe(data + word, at - word, s);
        word = at;
      }
      after_space = space;
      at += std::min(one_char_len(data + at), size - at);
    }
    if (at > word) cached_bpe(data + word, at - word, s);
  }

  void cached_bpe(const char* word, size_t size, Scratch& s) const {
    // Only words that start with `▁`, which repeat (English words, say); a stretch of Chinese between
    // punctuation rarely does, and looking it up would only cost a cache miss.
    if (size > kCacheMaxWordBytes || size < 3 || std::memcmp(word, kSpace, 3) != 0) {
      bpe(word, size, false, s);
      return;
    }
    if (s.slots.empty()) s.slots.assign(kCacheSlots, Scratch::Slot{0, 0, 0, 0, 0});
    const uint64_t h = hash_bytes(word, size) | 1;  // 0 marks an empty slot
    size_t i = h & (kCacheSlots - 1);
    for (;; i = (i + 1) & (kCacheSlots - 1)) {
      const auto& slot = s.slots[i];
      if (slot.hash == 0) break;
      if (slot.hash == h && slot.key_size == size && std::memcmp(s.key_arena.data() + slot.key_at, word, size) == 0) {
        s.pieces.insert(s.pieces.end(), s.value_arena.begin() + slot.value_at,
                        s.value_arena.begin() + slot.value_at + slot.value_size);
        return;
      }
    }
    const size_t first = s.pieces.size();
    bpe(word, size, false, s);
    if (s.cached >= kCacheSlots / 2) {  // full: start again (a cleared cache refills with the frequent words)
      std::fill(s.slots.begin(), s.slots.end(), Scratch::Slot{0, 0, 0, 0, 0});
      s.key_arena.clear();
      s.value_arena.clear();
      s.cached = 0;
      i = h & (kCacheSlots - 1);
    }
    s.slots[i] = Scratch::Slot{h, static_cast<uint32_t>(s.key_arena.size()), static_cast<uint32_t>(size),
                               static_cast<uint32_t>(s.value_arena.size()),
                               static_cast<uint32_t>(s.pieces.size() - first)};
    s.key_arena.append(word, size);
    s.value_arena.insert(s.value_arena.end(), s.pieces.begin() + first, s.pieces.end());
    ++s.cached;
  }

  // BPE over text[0, size); appends the resulting pieces. `match` cuts user-defined pieces out as frozen
  // symbols (the caller has done it already when cutting words).
  void bpe(const char* text, size_t size, bool match, Scratch& s) const {
    auto& symbols = s.symbols;
    auto& agenda = s.agenda;
    symbols.clear();
    agenda.clear();
    for (size_t at = 0; at < size;) {
      size_t len = match ? user_.match(text + at, size - at) : 0;
      const bool freeze = len > 0;
      if (!freeze) len = std::min(one_char_len(text + at), size - at);
      const int32_t key = freeze ? pieces_map_.find(text + at, len) : char_key(text + at, len);
      const int32_t index = static_cast<int32_t>(symbols.size());
      symbols.push_back(Scratch::Symbol{index - 1, at + len < size ? index + 1 : -1, key,
                                        static_cast<uint32_t>(at), static_cast<uint32_t>(len), freeze});
      at += len;
    }
    if (symbols.size() == 1 && !has_unused_) {
      s.pieces.push_back(Piece{symbols[0].key < 0 ? unk_id_ : key_ids_[symbols[0].key], symbols[0].size});
      return;
    }
    // Unused pieces: the pair each was last found from, by text (rev_merge).
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;
    // SymbolPairComparator of sentencepiece 0.2.3, which compares the scores' bit patterns as integers (the
    // same order as the floats', -0 below +0 included), then the left-most pair first.
    auto less = [](const Scratch::Candidate& a, const Scratch::Candidate& b) {
      const int32_t i1 = a.score, i2 = b.score;
      if ((i1 & i2) < 0) return i1 > i2 || (i1 == i2 && a.left > b.left);
      const bool score_less = (i1 ^ i2) < 0 ? i1 < 0 : i1 < i2;
      return score_less || (i1 == i2 && a.left > b.left);
    };
    auto consider = [&](int32_t left, int32_t right, bool heap) {
      if (left < 0 || right < 0) return;
      const auto& l = symbols[left];
      const auto& r = symbols[right];
      if (l.freeze || r.freeze || l.key < 0 || r.key < 0) return;
      if (!(left_part_[l.key] && right_part_[r.key])) return;  // no piece starts with l or ends with r
      const int32_t piece = merges_.find(PairMap::key(l.key, r.key));
      if (piece < 0) return;
      agenda.push_back(Scratch::Candidate{score_bits_[piece], left, right, piece, l.size + r.size});
      if (heap) std::push_heap(agenda.begin(), agenda.end(), less);
      if (has_unused_ && types_[piece] == UNUSED)
        rev_merge[std::string_view(text + l.start, l.size + r.size)] = {std::string_view(text + l.start, l.size),
                                                                         std::string_view(text + r.start, r.size)};
    };
    for (size_t i = 1; i < symbols.size(); ++i)
      consider(static_cast<int32_t>(i - 1), static_cast<int32_t>(i), false);
    std::make_heap(agenda.begin(), agenda.end(), less);
    while (!agenda.empty()) {
      std::pop_heap(agenda.begin(), agenda.end(), less);
      const auto top = agenda.back();
      agenda.pop_back();
      auto& l = symbols[top.left];
      auto& r = symbols[top.right];
      if (l.size == 0 || r.size == 0 || l.size + r.size != top.size) continue;  // no longer there
      l.size += r.size;
      l.key = top.piece;
      l.next = r.next;
      if (r.next >= 0) symbols[r.next].prev = top.left;
      r.size = 0;
      consider(l.prev, top.left, true);
      consider(top.left, l.next, true);
    }
    for (int32_t i = 0; i != -1; i = symbols[i].next) {
      const auto& sym = symbols[i];
      const int32_t id = sym.key < 0 ? unk_id_ : key_ids_[sym.key];
      if (has_unused_ && types_[id] == UNUSED) {
        resegment(std::string_view(text + sym.start, sym.size), rev_merge, s, 0);
      } else {
        s.pieces.push_back(Piece{id, sym.size});
      }
    }
  }

  // An unused piece becomes the two symbols it was last found from, each resegmented in turn; one never found
  // from a pair (a single character) is unknown. sentencepiece stops at depth 100 and keeps the piece.
  void resegment(std::string_view w,
                 const std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>>& rev_merge,
                 Scratch& s, int depth) const {
    int32_t id = pieces_map_.find(w.data(), w.size());
    if (id < 0) id = unk_id_;
    const auto size = static_cast<uint32_t>(w.size());
    if (depth > kMaxResegmentDepth || types_[id] != UNUSED) {
      s.pieces.push_back(Piece{id, size});
      return;
    }
    const auto p = rev_merge.find(w);
    if (p == rev_merge.end()) {
      s.pieces.push_back(Piece{unk_id_, size});
      return;
    }
    resegment(p->second.first, rev_merge, s, depth + 1);
    resegment(p->second.second, rev_merge, s, depth + 1);
  }

  // --- 3. ids (PopulateSentencePieceText)

  void emit(bool offsets, Scratch& s) const {
    const std::string& text = s.normalized;
    const auto& map = s.norm_to_orig;
    size_t consumed = 0;
    bool prev_unk = false;
    for (const Piece& p : s.pieces) {
      // BPE never gives a control piece (it gives unk for their text), so every piece covers its text.
      const int32_t id = p.id;
      const bool unk = id == unk_id_;
      if (unk && byte_fallback_) {
        const uint32_t begin = offsets ? map[consumed] : 0, end = offsets ? map[consumed + p.size] : 0;
        for (uint32_t i = 0; i < p.size; ++i) {
          s.ids.push_back(byte_ids_[static_cast<uint8_t>(text[consumed + i])]);
          if (offsets) {  // the last byte covers the character, the others nothing
            s.offsets.push_back(begin);
            s.offsets.push_back(i + 1 == p.size ? end : begin);
          }
        }
        consumed += p.size;
      } else {
        if (!(prev_unk && unk)) {
          s.ids.push_back(id);
          if (offsets) s.offsets.insert(s.offsets.end(), {map[consumed], map[consumed + p.size]});
        } else if (offsets) {
          s.offsets.back() = map[consumed + p.size];
        }
        consumed += p.size;
      }
      prev_unk = unk;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Python binding: a capsule holding the model, and functions on it.

struct Handle {
  Model model;
  Scratch scratch;  // for calls that hold the GIL
  // Work spaces of batch threads, kept between batches (their word caches stay warm). A batch runs without the
  // GIL, so `scratch` is not among them: another thread may encode with it meanwhile.
  std::mutex pool_mutex;
  std::vector<std::unique_ptr<Scratch>> pool;

  std::vector<std::unique_ptr<Scratch>> borrow(size_t n) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    std::vector<std::unique_ptr<Scratch>> out;
    while (out.size() < n && !pool.empty()) {
      out.push_back(std::move(pool.back()));
      pool.pop_back();
    }
    while (out.size() < n) out.push_back(std::make_unique<Scratch>());
    return out;
  }
  void give_back(std::vector<std::unique_ptr<Scratch>>& scratches) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    for (auto& s : scratches) pool.push_back(std::move(s));
  }
};

const char kCapsule[] = "baichuan.native_bpe.Model";

void destroy(PyObject* capsule) { delete static_cast<Handle*>(PyCapsule_GetPointer(capsule, kCapsule)); }

Handle* handle_of(PyObject* capsule) { return static_cast<Handle*>(PyCapsule_GetPointer(capsule, kCapsule)); }

PyObject* ids_list(const std::vector<int32_t>& ids) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < ids.size(); ++i) {
    PyObject* v = PyLong_FromLong(ids[i]);
    if (v == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
  }
  return list;
}

// Byte offsets of `text` to character offsets (ConvertToUnicodeSpans: a character starts at each lead byte).
PyObject* char_offsets(const char* text, size_t size, const std::vector<int64_t>& offsets, bool ascii) {
  const size_t n = offsets.size() / 2;
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (list == nullptr) return nullptr;
  std::vector<uint32_t> chars;
  if (!ascii) {
    chars.resize(size + 1);
    uint32_t count = 0;
    size_t at = 0;
    while (at < size) {
      const size_t len = std::max<size_t>(1, one_char_len(text + at));
      for (size_t i = at; i < std::min(at + len, size); ++i) chars[i] = count;
      ++count;
      at += len;
    }
    chars[size] = count;
  }
  for (size_t i = 0; i < n; ++i) {
    int64_t b = std::min<int64_t>(offsets[2 * i], size), e = std::min<int64_t>(offsets[2 * i + 1], size);
    if (!ascii) {
      b = chars[b];
      e = chars[e];
    }
    PyObject* pair = Py_BuildValue("(LL)", static_cast<long long>(b), static_cast<long long>(e));
    if (pair == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), pair);
  }
  return list;
}

PyObject* py_load(PyObject*, PyObject* arg) {
  char* data;
  Py_ssize_t size;
  if (PyBytes_AsStringAndSize(arg, &data, &size) < 0) return nullptr;
  auto* h = new Handle();
  bool ok;
  Py_BEGIN_ALLOW_THREADS;
  ok = h->model.load(std::string_view(data, static_cast<size_t>(size)));
  Py_END_ALLOW_THREADS;
  if (!ok) {
    PyErr_SetString(PyExc_ValueError, h->model.error.c_str());
    delete h;
    return nullptr;
  }
  PyObject* capsule = PyCapsule_New(h, kCapsule, destroy);
  if (capsule == nullptr) delete h;
  return capsule;
}

PyObject* py_encode(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "encode(model, text)");
    return nullptr;
  }
  Handle* h = handle_of(args[0]);
  if (h == nullptr) return nullptr;
  Py_ssize_t size;
  const char* text = PyUnicode_AsUTF8AndSize(args[1], &size);
  if (text == nullptr) return nullptr;
  try {
    h->model.encode(text, static_cast<size_t>(size), false, h->scratch);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  return ids_list(h->scratch.ids);
}

PyObject* py_encode_offsets(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "encode_offsets(model, text)");
    return nullptr;
  }
  Handle* h = handle_of(args[0]);
  if (h == nullptr) return nullptr;
  Py_ssize_t size;
  const char* text = PyUnicode_AsUTF8AndSize(args[1], &size);
  if (text == nullptr) return nullptr;
  try {
    h->model.encode(text, static_cast<size_t>(size), true, h->scratch);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  PyObject* ids = ids_list(h->scratch.ids);
  if (ids == nullptr) return nullptr;
  PyObject* offsets = char_offsets(text, static_cast<size_t>(size), h->scratch.offsets,
                                   PyUnicode_GET_LENGTH(args[1]) == size);
  if (offsets == nullptr) {
    Py_DECREF(ids);
    return nullptr;
  }
  return Py_BuildValue("(NN)", ids, offsets);
}

PyObject* py_encode_batch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "encode_batch(model, texts, threads)");
    return nullptr;
  }
  Handle* h = handle_of(args[0]);
  if (h == nullptr) return nullptr;
  PyObject* seq = PySequence_Fast(args[1], "texts must be a sequence of str");
  if (seq == nullptr) return nullptr;
  const long threads_asked = PyLong_AsLong(args[2]);
  if (threads_asked == -1 && PyErr_Occurred()) {
    Py_DECREF(seq);
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  std::vector<std::string_view> texts(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_ssize_t size;
    const char* text = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &size);
    if (text == nullptr) {
      Py_DECREF(seq);
      return nullptr;
    }
    texts[static_cast<size_t>(i)] = std::string_view(text, static_cast<size_t>(size));
  }
  std::vector<std::vector<int32_t>> results(static_cast<size_t>(n));
  // At most one thread per text, and a sane cap whatever is asked.
  const size_t workers = static_cast<size_t>(std::max(1L, std::min<long>({threads_asked, std::max<long>(n, 1), 256})));
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS;
  try {
    // Texts are handed out in small chunks from a shared counter, so a thread that drew long texts does not
    // hold up the others.
    std::atomic<size_t> next{0};
    const size_t chunk = std::max<size_t>(1, std::min<size_t>(64, texts.size() / (workers * 8) + 1));
    std::atomic<bool> out_of_memory{false};
    auto work = [&](Scratch* scratch) {
      try {
        for (;;) {
          const size_t first = next.fetch_add(chunk);
          if (first >= texts.size() || out_of_memory) return;
          for (size_t i = first; i < std::min(first + chunk, texts.size()); ++i) {
            h->model.encode(texts[i].data(), texts[i].size(), false, *scratch);
            results[i] = scratch->ids;
          }
        }
      } catch (const std::bad_alloc&) {  // an exception must not leave a thread
        out_of_memory = true;
      }
    };
    auto scratches = h->borrow(workers);
    std::vector<std::thread> threads;
    for (size_t t = 1; t < workers; ++t) {
      try {
        threads.emplace_back(work, scratches[t].get());
      } catch (const std::system_error&) {  // no more threads to be had: the others share the work
        break;
      }
    }
    work(scratches[0].get());
    for (auto& t : threads) t.join();
    h->give_back(scratches);
    failed = out_of_memory;
  } catch (const std::bad_alloc&) {
    failed = true;
  }
  Py_END_ALLOW_THREADS;
  if (failed) {
    Py_DECREF(seq);
    return PyErr_NoMemory();
  }
  Py_DECREF(seq);
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* ids = ids_list(results[static_cast<size_t>(i)]);
    if (ids == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, ids);
  }
  return out;
}

PyObject* py_splits_words(PyObject*, PyObject* arg) {
  Handle* h = handle_of(arg);
  if (h == nullptr) return nullptr;
  return PyBool_FromLong(h->model.splits_words());
}

PyMethodDef kMethods[] = {
    {"load", py_load, METH_O, "load(model_proto: bytes) -> model: a serialized SentencePiece BPE ModelProto"},
    {"encode", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_encode)), METH_FASTCALL,
     "encode(model, text) -> ids"},
    {"encode_offsets", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_encode_offsets)),
     METH_FASTCALL, "encode_offsets(model, text) -> (ids, [(begin, end)] in characters)"},
    {"encode_batch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_encode_batch)), METH_FASTCALL,
     "encode_batch(model, texts, threads) -> [ids]; runs without the GIL"},
    {"splits_words", py_splits_words, METH_O, "whether the model is encoded word by word (with the word cache)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "baichuan_bpe", "Exact SentencePiece BPE encoding", -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_baichuan_bpe(void) { return PyModule_Create(&kModule); }
