// Helpers shared by the drivers (routed_lora.cpp, gate.cpp, attention.cpp, layer_norm.cpp): exported symbols,
// OpenMP thread ids, reusable workspace memory, a row-blocked parallel loop.
#pragma once

#include <stdint.h>

#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

#define TP_EXPORT extern "C" __attribute__((visibility("default")))

// The exported functions' interface: bump on any change of a signature or of an argument's meaning, together
// with ABI_VERSION in tp_kernels/_ext.py (which refuses a library reporting another number).
#define TP_ABI_VERSION 7

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

// Runs body(first row, rows, scratch) over blocks of rows_per_task rows of an (n, width) problem on up to
// `threads` OpenMP threads (one when n * width is too small to pay for more), each with scratch_floats floats of
// its own. Returns kNoMemory if the scratch cannot be allocated, else kOk.
template <typename Body>
int over_row_blocks(int64_t n, int64_t width, int64_t rows_per_task, int threads, int64_t scratch_floats, Body body) {
    constexpr int64_t kParallelMin = int64_t(1) << 15;  // elements below which threads cost more than they save
    const int64_t tasks = (n + rows_per_task - 1) / rows_per_task;
    const int nt = n * width >= kParallelMin && threads > 1 ? threads : 1;
    try {
        const int64_t per_thread = piece(scratch_floats, sizeof(float));
        Workspace ws;
        const int64_t o_scratch = ws.reserve(nt * per_thread);
        char* const base = ws.commit();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t r0 = t * rows_per_task, rows = n - r0 < rows_per_task ? n - r0 : rows_per_task;
            body(r0, rows, reinterpret_cast<float*>(base + o_scratch + per_thread * thread_id()));
        }
    } catch (...) {
        return kNoMemory;
    }
    return kOk;
}

}  // namespace tp
