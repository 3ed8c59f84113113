// ddpm-rt from C++17: an RAII wrapper over the C ABI (ddpm_rt.h), progress on stderr,
// Ctrl-C cancels cleanly, the images written as one binary PPM (P6) per image row.
//
//   ddpm_rt_example BUNDLE "red apple" SEED NUM OUT.ppm [STEPS] [GUIDANCE]
//   ddpm_rt_example --init IN.ppm [--strength S] [--mask MASK.pgm] BUNDLE PROMPT SEED NUM OUT.ppm
//
// --init starts from a binary PPM (P6, any size) -- image-to-image; --mask (a binary PGM,
// P5, of the same size: light = repaint) inpaints (ddpm_rt_generate_from_image).
//
// Exit status: 0, or the library's status code (see ddpm_rt.h), 64 for usage errors.
#include "ddpm_rt.h"

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

class Error : public std::runtime_error {
 public:
  Error(int code, const std::string &what) : std::runtime_error(what), code(code) {}
  int code;
};

// Owns one ddpm_rt_handle; closes it when it goes out of scope.
class Generator {
 public:
  explicit Generator(const std::string &bundle, const char *options_json = nullptr) {
    int rc = ddpm_rt_open(bundle.c_str(), options_json, &handle_);
    if (rc != DDPM_RT_OK) throw Error(rc, ddpm_rt_last_error(nullptr));
    check(ddpm_rt_image_shape(handle_, &height_, &width_, &channels_));
  }
  ~Generator() { ddpm_rt_close(handle_); }
  Generator(const Generator &) = delete;
  Generator &operator=(const Generator &) = delete;

  int height() const { return height_; }
  int width() const { return width_; }

  // num images, each height x width x 3 bytes (RGB), one after another.
  std::vector<std::uint8_t> generate(const std::string &prompt, int num, std::uint64_t seed,
                                     int steps = 0, double guidance = 0.0,
                                     ddpm_rt_progress_fn progress = nullptr,
                                     void *user = nullptr) {
    std::vector<std::uint8_t> rgb(static_cast<size_t>(num) * height_ * width_ * 3);
    size_t written = 0;
    check(ddpm_rt_generate(handle_, prompt.c_str(), num, seed, steps, guidance, progress, user,
                           rgb.data(), rgb.size(), &written));
    rgb.resize(written);
    return rgb;
  }

  // The same, starting from a picture (width x height x channels bytes, 3 or 4 channels)
  // and, unless mask is empty, repainting where mask (width x height bytes) is >= 128.
  std::vector<std::uint8_t> generate_from_image(const std::string &prompt, int num,
                                                std::uint64_t seed, double strength,
                                                const std::vector<std::uint8_t> &picture,
                                                int width, int height, int channels,
                                                const std::vector<std::uint8_t> &mask = {},
                                                int steps = 0, double guidance = 0.0,
                                                ddpm_rt_progress_fn progress = nullptr,
                                                void *user = nullptr) {
    std::vector<std::uint8_t> rgb(static_cast<size_t>(num) * height_ * width_ * 3);
    size_t written = 0;
    check(ddpm_rt_generate_from_image(handle_, prompt.c_str(), num, seed, steps, guidance,
                                      strength, picture.data(), width, height, channels,
                                      mask.empty() ? nullptr : mask.data(), progress, user,
                                      rgb.data(), rgb.size(), &written));
    rgb.resize(written);
    return rgb;
  }

 private:
  void check(int rc) {
    if (rc != DDPM_RT_OK) throw Error(rc, ddpm_rt_last_error(handle_));
  }
  ddpm_rt_handle *handle_ = nullptr;
  int height_ = 0, width_ = 0, channels_ = 0;
};

}  // namespace ddpm

// A binary PPM (P6, 3 channels) or PGM (P5, 1 channel) with maxval 255: its bytes.
static std::vector<std::uint8_t> read_netpbm(const std::string &path, const char *magic,
                                             int channels, int &width, int &height) {
  std::ifstream in(path, std::ios::binary);
  std::string m;
  int maxval = 0;
  in >> m >> width >> height >> maxval;
  if (!in || m != magic || maxval != 255 || width < 1 || height < 1 || width > 4096 ||
      height > 4096)
    throw std::runtime_error(path + ": not a binary " + magic + " file with maxval 255");
  in.get();  // the one whitespace byte before the pixels
  std::vector<std::uint8_t> px(static_cast<size_t>(width) * height * channels);
  in.read(reinterpret_cast<char *>(px.data()), static_cast<std::streamsize>(px.size()));
  if (!in) throw std::runtime_error(path + ": truncated");
  return px;
}

static std::atomic<bool> g_cancel{false};

extern "C" void on_sigint(int) { g_cancel = true; }

extern "C" int on_progress(int step, int total, void *) {
  std::fprintf(stderr, "\rstep %d/%d", step, total);
  if (step == total) std::fprintf(stderr, "\n");
  return g_cancel ? 0 : 1;  // 0 cancels: ddpm_rt_generate returns DDPM_RT_CANCELLED
}

int main(int argc, char **argv) {
  const char *prog = argv[0], *init = nullptr, *mask_path = nullptr;
  double strength = -1.0;  // < 0: the runtime's default
  bool bad = false;
  while (argc > 2 && std::strncmp(argv[1], "--", 2) == 0 && !bad) {  // options before BUNDLE
    std::string flag = argv[1];
    if (flag == "--init") init = argv[2];
    else if (flag == "--mask") mask_path = argv[2];
    else if (flag == "--strength") strength = std::stod(argv[2]);
    else bad = true;
    argv += 2;
    argc -= 2;
  }
  if (bad || argc < 6 || (mask_path && !init)) {
    std::cerr << "usage: " << prog << " [--init IN.ppm [--strength S] [--mask MASK.pgm]] "
              << "BUNDLE PROMPT SEED NUM OUT.ppm [STEPS] [GUIDANCE] [OPTIONS_JSON]\n";
    return 64;
  }
  std::signal(SIGINT, on_sigint);  // the host owns its signals; the library installs none
  try {
    ddpm::Generator gen(argv[1], argc > 8 ? argv[8] : nullptr);  // e.g. {"threads":2}
    int num = std::stoi(argv[4]);
    std::uint64_t seed = std::stoull(argv[3]);
    int steps = argc > 6 ? std::stoi(argv[6]) : 0;
    double guidance = argc > 7 ? std::stod(argv[7]) : 0.0;
    std::vector<std::uint8_t> rgb;
    if (init) {
      int w = 0, h = 0, mw = 0, mh = 0;
      auto picture = read_netpbm(init, "P6", 3, w, h);
      std::vector<std::uint8_t> mask;
      if (mask_path) mask = read_netpbm(mask_path, "P5", 1, mw, mh);
      if (mask_path && (mw != w || mh != h))
        throw std::runtime_error("the mask's size is not the picture's");
      rgb = gen.generate_from_image(argv[2], num, seed, strength, picture, w, h, 3, mask, steps,
                                    guidance, on_progress);
    } else {
      rgb = gen.generate(argv[2], num, seed, steps, guidance, on_progress);
    }
    // The images stacked vertically in one PPM: width x (num * height).
    std::ofstream out(argv[5], std::ios::binary);
    out << "P6\n" << gen.width() << " " << gen.height() * num << "\n255\n";
    out.write(reinterpret_cast<const char *>(rgb.data()), static_cast<std::streamsize>(rgb.size()));
    if (!out) throw std::runtime_error("cannot write the output file");
    std::cerr << "ddpm-rt " << ddpm_rt_version() << ": wrote " << argv[5] << "\n";
    return 0;
  } catch (const ddpm::Error &e) {
    std::cerr << "error: " << e.what() << " (status " << e.code << ")\n";
    return e.code;
  } catch (const std::exception &e) {
    std::cerr << "error: " << e.what() << "\n";
    return 64;
  }
}
