// vqkit/io/atomic_file.hpp - write a file atomically (POSIX).
//
// write_file_atomic(path, bytes, where) writes "<path>.tmp.<pid>" in the same
// directory, fsyncs it, renames it over path and fsyncs the directory. On
// any failure it throws vqkit::error (prefixed by `where`, naming the file
// and saying that path is unchanged), removes the temporary file and leaves
// an existing file at path intact. Used by safetensors::save and npy::save.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "vqkit/core/error.hpp"

namespace vqkit::io {

namespace detail {

/// Writes bytes to path atomically (temp file + fsync + rename).
inline void write_file_atomic(const std::string& path, const std::vector<std::uint8_t>& bytes,
                              const char* where) {
  const std::string tmp = path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  VQKIT_REQUIRE(fd >= 0, where, "cannot create the temporary file '", tmp,
                "': ", std::strerror(errno));
  auto fail = [&](const char* what, int err, bool close_fd) {
    if (close_fd) ::close(fd);
    ::unlink(tmp.c_str());
    ::vqkit::detail::throw_error(where, what, " '", tmp, "' failed: ", std::strerror(err), "; '",
                                 path, "' is unchanged");
  };
  const std::uint8_t* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ::ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("writing", n < 0 ? errno : EIO, true);
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("fsync of", errno, true);
  if (::close(fd) != 0) fail("closing", errno, false);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    ::vqkit::detail::throw_error(where, "renaming '", tmp, "' to '", path,
                                 "' failed: ", std::strerror(err), "; '", path, "' is unchanged");
  }
  // Make the rename itself durable (best effort: not every filesystem allows
  // fsync on a directory).
  const auto slash = path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? std::string(".") : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace detail

}  // namespace vqkit::io
