//! Scripted providers for pool tests under paused time.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::test_error::TestError;

/// What one attempt does.
#[derive(Clone, Debug)]
pub enum Step {
    Ok,
    Io(io::ErrorKind),
    Status(u16, Option<Duration>),
    Text(&'static str),
    /// Never returns (the attempt timer must cut it).
    Hang,
    /// Waits, then does the inner step.
    After(Duration, Box<Step>),
}

/// A provider that follows a script, repeating its last step, and logs
/// when each attempt started.
#[derive(Debug)]
pub struct Scripted {
    pub name: &'static str,
    steps: Mutex<VecDeque<Step>>,
    last: Mutex<Step>,
    pub calls: Mutex<Vec<Instant>>,
}

impl Scripted {
    pub fn new(name: &'static str, steps: Vec<Step>) -> Arc<Self> {
        let last = steps.last().cloned().unwrap_or(Step::Ok);
        Arc::new(Scripted {
            name,
            steps: Mutex::new(steps.into()),
            last: Mutex::new(last),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Replaces the script (e.g. the provider came back).
    pub fn set(&self, steps: Vec<Step>) {
        *self.last.lock().unwrap() = steps.last().cloned().unwrap_or(Step::Ok);
        *self.steps.lock().unwrap() = steps.into();
    }

    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn times(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    /// Starts one attempt.
    pub fn attempt(
        self: &Arc<Self>,
    ) -> impl Future<Output = Result<&'static str, TestError>> + use<> {
        self.calls.lock().unwrap().push(Instant::now());
        let step = {
            let mut steps = self.steps.lock().unwrap();
            steps
                .pop_front()
                .unwrap_or_else(|| self.last.lock().unwrap().clone())
        };
        let name = self.name;
        async move { run(step, name).await }
    }
}

async fn run(step: Step, name: &'static str) -> Result<&'static str, TestError> {
    let mut step = step;
    loop {
        return match step {
            Step::Ok => Ok(name),
            Step::Io(kind) => Err(TestError::Io(io::Error::from(kind))),
            Step::Status(code, ra) => Err(TestError::Status(code, ra)),
            Step::Text(t) => Err(TestError::Text(t)),
            Step::Hang => std::future::pending().await,
            Step::After(d, inner) => {
                tokio::time::sleep(d).await;
                step = *inner;
                continue;
            }
        };
    }
}

pub fn refused() -> Step {
    Step::Io(io::ErrorKind::ConnectionRefused)
}
