//! Progress bars for the long stages (calibration, ID estimation).
//!
//! They draw on stderr, only when it is a terminal (indicatif's own
//! check), and only while progress is enabled for the process: the
//! command line leaves it on, the Python package turns it off unless a call
//! asks for it, since a library drawing on its caller's terminal is a
//! surprise.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns progress bars on or off for the whole process.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether progress bars are drawn (on a terminal).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A bar of `len` steps labelled `message`, drawn with `template`
/// (indicatif's syntax); hidden when progress is off.
pub fn bar(len: u64, message: &'static str, template: &str) -> ProgressBar {
    if !enabled() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(message);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}
