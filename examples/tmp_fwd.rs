use candle_core::{Device, Tensor};
use repnoise::model::{positions_for, ForwardOpts, Llama, Logits};
use std::time::Instant;
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 68] =
    b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0\0";
fn ru() -> (i64, f64, f64, i64) {
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        (
            u.ru_minflt,
            u.ru_utime.tv_sec as f64 + u.ru_utime.tv_usec as f64 * 1e-6,
            u.ru_stime.tv_sec as f64 + u.ru_stime.tv_usec as f64 * 1e-6,
            u.ru_nvcsw + u.ru_nivcsw,
        )
    }
}
fn main() -> anyhow::Result<()> {
    if std::env::var("TMP_INSTALL").is_ok() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        return pool.install(main2);
    }
    main2()
}
fn main2() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let m = repnoise::modelio::load_hf_dir(std::path::Path::new("bench/out/smollm2-hf"), &dev)?;
    let (b, t) = (4usize, 128usize);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (300 + i * 7919 % 40000) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let pos = positions_for(b, t, 0, &dev)?;
    let opts = ForwardOpts {
        logits: Logits::None,
        ..Default::default()
    };
    for trainable in [false; 4] {
        let net = if trainable {
            Llama::trainable(&m.config, &m.params)?
        } else {
            Llama::frozen(&m.config, &m.params)?
        };
        for _ in 0..5 {
            let r0 = ru();
            let t0 = Instant::now();
            let out = net.forward(&ids, &pos, None, None, opts)?;
            let s = out.residual.sum_all()?.to_scalar::<f32>()?;
            let r1 = ru();
            println!(
                "trainable {trainable}: {:.3} s, faults {} user {:.3} sys {:.3} csw {} ({s})",
                t0.elapsed().as_secs_f64(),
                r1.0 - r0.0,
                r1.1 - r0.1,
                r1.2 - r0.2,
                r1.3 - r0.3
            );
        }
    }
    Ok(())
}
