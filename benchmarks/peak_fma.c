/* Single-core FP32 peak: 12 independent AVX-512 FMA chains (Zen 4/5, Ice Lake+), and the
   core clock from a chain of dependent adds (1 per cycle). Used by docs/performance.md.
   gcc -O2 -mavx512f -mfma -o /tmp/peak benchmarks/peak_fma.c && /tmp/peak */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){
  __m512 a[12]; __m512 m=_mm512_set1_ps(0.9999f), c=_mm512_set1_ps(0.0001f);
  for(int i=0;i<12;i++) a[i]=_mm512_set1_ps(i);
  long n=200000000L; double t=now();
  for(long k=0;k<n;k++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm512_fmadd_ps(a[i],m,c);
  }
  double d=now()-t; float s=0; float o[16];
  for(int i=0;i<12;i++){_mm512_storeu_ps(o,a[i]); s+=o[0];}
  printf("avx512 fma fp32 GFLOP/s %.1f (sum %f)\n", n*12.0*16*2/d/1e9, s);
  /* clock: dependent add chain, 1 cycle each */
  volatile long x=0; long y=0; t=now();
  for(long k=0;k<2000000000L;k++){ __asm__ volatile("add $1, %0" : "+r"(y)); }
  d=now()-t; x=y; printf("dependent-add loop est GHz %.2f\n", 2.0/d);
}
