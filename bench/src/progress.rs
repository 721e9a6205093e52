//! A load run with a progress bar on stderr, for the interactive
//! commands.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::initiator::ConnectOpts;
use crate::job::JobSpec;
use crate::load::{self, Progress, VerifyState};

/// Runs one spec with a progress bar on stderr (hidden when not a TTY).
pub fn run_with_progress(
    opts: &ConnectOpts,
    spec: &JobSpec,
    verify: Option<Arc<VerifyState>>,
    show: bool,
) -> Result<load::RunOutput> {
    let show = show && std::io::stderr().is_terminal();
    let ramp = Duration::from_millis(spec.ramp_ms);
    let pb = if show {
        let len = spec.runtime_ms.map_or(0, |r| r + spec.ramp_ms);
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed}/{duration} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_prefix(format!("{} qd={}", spec.name, spec.qd));
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut last = (Duration::ZERO, 0u64);
    let progress = Arc::new(Progress::default());
    let mut tick = |p: &Progress, t: Duration| {
        let ios = p.ios.load(std::sync::atomic::Ordering::Relaxed);
        let dt = (t - last.0).as_secs_f64();
        if dt >= 0.5 {
            let iops = (ios - last.1) as f64 / dt;
            pb.set_message(format!(
                "{:.0} IOPS{}",
                iops,
                if t < ramp { " (ramp)" } else { "" }
            ));
            last = (t, ios);
        }
        pb.set_position(t.as_millis() as u64);
    };
    let r = load::run(opts, spec, verify, progress, &mut tick);
    pb.finish_and_clear();
    r
}
