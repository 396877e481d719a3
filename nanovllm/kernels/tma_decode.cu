// One program per (sequence, KV head, split); see tma_decode.py for the design.
#define BLOCK_N 64
#define HEAD_DIM 128
#define TILE_BYTES (4 * BLOCK_N * 128)  // K and V, two 64-column halves each, 8 KB per box
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
// Byte offset of element (row, col) of a [BLOCK_N, 64] box written with the 128-byte swizzle:
// 16-byte chunk c of row r sits at chunk c ^ (r % 8).
__device__ __forceinline__ unsigned swz(int row, int col) {
    return row * 128 + ((((col >> 3) ^ (row & 7))) << 4) + ((col & 7) << 1);
}
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
#ifdef NANOVLLM_FP16
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
__device__ __forceinline__ unsigned short to_half(float x) {
    unsigned short r;
#ifdef NANOVLLM_FP16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}
__device__ __forceinline__ void mma16816(float* d, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
#ifdef NANOVLLM_FP16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void wait_barrier(unsigned bar, unsigned parity) {
    asm volatile("{\n .reg .pred P1;\n WAIT:\n"
                 " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 " @P1 bra DONE;\n bra WAIT;\n DONE:\n}" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_box(unsigned dst, const void* map, unsigned bar, int col,
                                        int row) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4}], [%2];"
                 :: "r"(dst), "l"(map), "r"(bar), "r"(col), "r"(row) : "memory");
}

extern "C" __global__ void __launch_bounds__(160, MIN_PROGRAMS) decode_tma(
    const unsigned short* __restrict__ q, const void* k_map, const void* v_map,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    unsigned short* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_lse,
    double scale_log2e_d, int stride_qs, int stride_qh, int stride_bt, int stride_os,
    int stride_oh, int num_heads, int group, int block_size, int num_splits, int num_kv_heads,
    int hnd) {
    extern __shared__ unsigned char smem_raw[];
    // full[s]: stage s holds its tile (TMA bytes landed); empty[s]: the 4 compute warps are done
    // with it, so the producer may refill it.
    __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const float scale_log2e = (float)scale_log2e_d;
    const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzled boxes: 1 KB aligned
    unsigned char* base_ptr = smem_raw + (base - smem_addr(smem_raw));

    const int ctx = context_lens[seq];
    const int per_split = ((ctx + num_splits - 1) / num_splits + BLOCK_N - 1) / BLOCK_N * BLOCK_N;
    const int start = split * per_split;
    const int end = min(start + per_split, ctx);
    const int num_tiles = end > start ? (end - start + BLOCK_N - 1) / BLOCK_N : 0;
    const int* table = block_tables + (long long)seq * stride_bt;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&full[s])));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 4;" :: "r"(smem_addr(&empty[s])));
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();

    if (warp == 4) {
        // Producer warp: one lane issues tile t's K and V boxes into stage t % STAGES once the
        // four compute warps have released that stage (its previous tile, t - STAGES).
        if (lane == 0) {
            for (int t = 0; t < num_tiles; ++t) {
                const int s = t % STAGES, n0 = start + t * BLOCK_N;
                if (t >= STAGES) wait_barrier(smem_addr(&empty[s]), ((t / STAGES) - 1) & 1);
                // NHD: rows are tokens, each holding every head; HND: rows are (block, head,
                // token).
                const int blk = table[n0 / block_size], pos = n0 % block_size;
                const int row = (hnd ? blk * num_kv_heads + kvh : blk) * block_size + pos;
                const int col = hnd ? 0 : kvh * HEAD_DIM;
                const unsigned bar = smem_addr(&full[s]), dst = base + s * TILE_BYTES;
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                             :: "r"(bar), "r"(TILE_BYTES) : "memory");
                tma_box(dst, k_map, bar, col, row);
                tma_box(dst + 8192, k_map, bar, col + 64, row);
                tma_box(dst + 16384, v_map, bar, col, row);
                tma_box(dst + 24576, v_map, bar, col + 64, row);
            }
        }
    }

    // Q as mma A fragments: rows = the group's heads (gid < group), columns = head_dim in 8
    // k-chunks of 16; rows 8-15 of the 16-row fragment are padding (zero).
    unsigned qa[8][2];
    float acc[16][4];
    float m_i = NEG_INF, l_i = 0.f;  // row gid's running max (log2 domain) and sum
    if (warp < 4) {
        const bool real = gid < group;
        const long long head = kvh * group + (real ? gid : 0);
        const unsigned* qrow =
            (const unsigned*)(q + (long long)seq * stride_qs + head * stride_qh);
        for (int j = 0; j < 8; ++j) {
            qa[j][0] = real ? qrow[(16 * j + 2 * tig) >> 1] : 0u;
            qa[j][1] = real ? qrow[(16 * j + 8 + 2 * tig) >> 1] : 0u;
        }
        for (int i = 0; i < 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    }
    const int kr0 = warp * 16;  // this warp's keys within a tile

    for (int t = 0; warp < 4 && t < num_tiles; ++t) {
        const int s = t % STAGES;
        wait_barrier(smem_addr(&full[s]), (t / STAGES) & 1);
        const unsigned kt = base + s * TILE_BYTES;  // shared-memory addresses of the K, V tiles
        const unsigned vt = kt + 16384;
        const int n0 = start + t * BLOCK_N;

        // S = Q K^T for this warp's 16 keys (two n-tiles of 8). B fragments through ldmatrix
        // (4 matrices: 8 keys x 4 consecutive 8-dim chunks = k-chunks j, j + 1); two
        // accumulators per n-tile so that consecutive mma do not wait on each other.
        float sc[2][2][4];
        for (int i = 0; i < 16; ++i) (&sc[0][0][0])[i] = 0.f;
        for (int j = 0; j < 8; j += 2) {
            const int chunk = 2 * j + (lane >> 3);  // this lane's 8-dim chunk: 0..15
            for (int nt = 0; nt < 2; ++nt) {
                const int row = kr0 + nt * 8 + (lane & 7);
                const unsigned addr = kt + (chunk >> 3) * 8192 + swz(row, (chunk & 7) * 8);
                unsigned b0, b1, b2, b3;
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                             : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(addr));
                mma16816(sc[nt][0], qa[j][0], 0u, qa[j][1], 0u, b0, b1);
                mma16816(sc[nt][1], qa[j + 1][0], 0u, qa[j + 1][1], 0u, b2, b3);
            }
        }
        // Online softmax on row gid (its 16 keys are spread over the 4 lanes of this gid).
        float mx = NEG_INF, sv[2][2];
        for (int nt = 0; nt < 2; ++nt)
            for (int e = 0; e < 2; ++e) {
                const int key = n0 + kr0 + nt * 8 + 2 * tig + e;
                const float v = sc[nt][0][e] + sc[nt][1][e];
                sv[nt][e] = key < end ? v * scale_log2e : NEG_INF;
                mx = fmaxf(mx, sv[nt][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_i, mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;  // no key yet: keep zeros
        const float alpha = exp2f(m_i - m_use);
        float p[2][2], psum = 0.f;
        for (int nt = 0; nt < 2; ++nt)
            for (int e = 0; e < 2; ++e) {
                p[nt][e] = exp2f(sv[nt][e] - m_use);
                psum += p[nt][e];
            }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l_i = l_i * alpha + psum;
        m_i = m_new;
        const unsigned pa0 = pack2(p[0][0], p[0][1]), pa2 = pack2(p[1][0], p[1][1]);

        // O += P V: B fragments of V (keys x dims) through ldmatrix.trans, two 8-dim tiles each.
        const int mrow = kr0 + ((lane >> 3) & 1) * 8 + (lane & 7);
        for (int dp = 0; dp < 8; ++dp) {
            const int chunk = 2 * dp + (lane >> 4);  // 8-dim chunk this lane addresses
            const unsigned addr = vt + (chunk >> 3) * 8192 + swz(mrow, (chunk & 7) * 8);
            unsigned r0, r1, r2, r3;
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                         : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
            for (int h = 0; h < 2; ++h) {
                float* a = acc[2 * dp + h];
                a[0] *= alpha;
                a[1] *= alpha;
                mma16816(a, pa0, 0u, pa2, 0u, h ? r2 : r0, h ? r3 : r1);
            }
        }
        __syncwarp();
        if (lane == 0)  // this warp is done with stage s
            asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(&empty[s]))
                         : "memory");
    }

    // Merge the 4 warps' (max, sum, acc) of each head row, then write.
    __syncthreads();
    float* sm_acc = (float*)base_ptr;           // [4 warps][8 rows][HEAD_DIM]
    float* sm_ml = sm_acc + 4 * 8 * HEAD_DIM;   // [4 warps][8 rows][2]
    for (int dt = 0; warp < 4 && dt < 16; ++dt) {
        sm_acc[(warp * 8 + gid) * HEAD_DIM + dt * 8 + 2 * tig] = acc[dt][0];
        sm_acc[(warp * 8 + gid) * HEAD_DIM + dt * 8 + 2 * tig + 1] = acc[dt][1];
    }
    if (warp < 4 && tig == 0) {
        sm_ml[(warp * 8 + gid) * 2] = m_i;
        sm_ml[(warp * 8 + gid) * 2 + 1] = l_i;
    }
    __syncthreads();
    for (int idx = tid; idx < group * HEAD_DIM; idx += blockDim.x) {
        const int row = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float mall = NEG_INF;
        for (int w = 0; w < 4; ++w) mall = fmaxf(mall, sm_ml[(w * 8 + row) * 2]);
        float l = 0.f, o = 0.f;
        if (mall != NEG_INF) {
            for (int w = 0; w < 4; ++w) {
                const float mw = sm_ml[(w * 8 + row) * 2];
                const float f = mw == NEG_INF ? 0.f : exp2f(mw - mall);
                l += sm_ml[(w * 8 + row) * 2 + 1] * f;
                o += sm_acc[(w * 8 + row) * HEAD_DIM + d] * f;
            }
            o /= l;
        }
        const int head = kvh * group + row;
        if (num_splits == 1) {
            out[(long long)seq * stride_os + (long long)head * stride_oh + d] = to_half(o);
        } else {
            const long long r = ((long long)seq * num_heads + head) * num_splits + split;
            part_o[r * HEAD_DIM + d] = o;
            if (d == 0) part_lse[r] = mall == NEG_INF ? NEG_INF : mall + log2f(l);
        }
    }
}
