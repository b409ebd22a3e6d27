// Helpers shared by the drivers (routed_lora.cpp, gate.cpp): exported symbols, OpenMP thread ids,
// reusable workspace memory.
#pragma once

#include <stdint.h>

#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

#define TP_EXPORT extern "C" __attribute__((visibility("default")))

// The exported functions' interface: bump on any change of a signature or of an argument's meaning, together
// with ABI_VERSION in tp_kernels/_ext.py (which refuses a library reporting another number).
#define TP_ABI_VERSION 5

namespace tp {

enum Status : int { kOk = 0, kBadIndex = 1, kNoMemory = 2, kBadArgument = 3 };

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline int64_t piece(int64_t count, int64_t size) { return round_up(count > 0 ? count * size : 0, 64); }

// Memory carved out of one grow-only allocation per calling thread, reused across calls: freshly
// mapped pages would cost a page fault each on every call (glibc hands large blocks back to the OS on
// free). Reserve every piece first, then commit() once. Contents are uninitialised.
class Workspace {
public:
    int64_t reserve(int64_t bytes) {
        const int64_t offset = size_;
        size_ += round_up(bytes, 64);
        return offset;
    }
    char* commit() {
        thread_local std::unique_ptr<char[]> buf;
        thread_local int64_t capacity = 0;
        if (size_ > capacity) {
            buf.reset();
            buf.reset(new char[size_ + 64]);
            capacity = size_;
        }
        const uintptr_t p = reinterpret_cast<uintptr_t>(buf.get());
        return reinterpret_cast<char*>((p + 63) & ~uintptr_t(63));
    }

private:
    int64_t size_ = 0;
};

// Hands out consecutive 64-byte aligned arrays from one thread's part of a workspace.
class Carver {
public:
    explicit Carver(char* p) : p_(p) {}
    template <typename T>
    T* take(int64_t count) {
        T* out = reinterpret_cast<T*>(p_);
        p_ += piece(count, sizeof(T));
        return out;
    }

private:
    char* p_;
};

}  // namespace tp
