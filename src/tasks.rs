//! The task registry: every long-lived task of a scope (the process, one leader term) is spawned
//! through a [`Tasks`], under a name and the scope's cancellation token. The first task to fail
//! cancels the token (so the rest stop); a drain waits for the others until a deadline, then
//! aborts what is left and names it. Dropping a [`Tasks`] aborts every task it holds.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What ends a task scope besides the tasks' own errors.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task panicked or was aborted; the cause is kept.
    #[error("task {name:?} panicked or was aborted")]
    Join {
        name: &'static str,
        #[source]
        source: JoinError,
    },
    /// A task meant to run until told to stop ended on its own, without an error.
    #[error("task {name:?} stopped unexpectedly")]
    Stopped { name: &'static str },
    /// The deadline of a drain passed; these tasks were aborted.
    #[error("tasks did not stop in time and were aborted: {pending}")]
    Unfinished { pending: Names },
}

/// Task names, for logs and errors ("a, b, c").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names(pub Vec<&'static str>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// One task that ended: its name and what it returned (or why it did not).
pub(crate) struct Ended<E> {
    pub name: &'static str,
    pub result: Result<Result<(), E>, JoinError>,
}

impl<E: From<TaskError>> Ended<E> {
    /// The task's own error, or its join error (panic, abort) as [`TaskError::Join`].
    pub fn into_result(self) -> Result<(), E> {
        match self.result {
            Ok(r) => r,
            Err(source) => Err(TaskError::Join {
                name: self.name,
                source,
            }
            .into()),
        }
    }
}

/// Named tasks under one cancellation token; see the module doc.
pub(crate) struct Tasks<E> {
    set: JoinSet<Result<(), E>>,
    names: HashMap<Id, &'static str>,
    token: CancellationToken,
}

impl<E: From<TaskError> + Send + 'static> Tasks<E> {
    /// An empty registry whose tasks stop when `token` is cancelled.
    pub fn new(token: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            token,
        }
    }

    /// The scope's token; hand a clone to every task.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Spawns `fut` as task `name`.
    pub fn spawn(
        &mut self,
        name: &'static str,
        fut: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let h = self.set.spawn(fut);
        self.names.insert(h.id(), name);
    }

    /// The next task to end; `None` once none is left. A failed task (error, panic) cancels
    /// the token, so the others stop.
    pub async fn next_or_none(&mut self) -> Option<Ended<E>> {
        let (id, result) = match self.set.join_next_with_id().await? {
            Ok((id, out)) => (id, Ok(out)),
            Err(e) => (e.id(), Err(e)),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed task");
        if !matches!(result, Ok(Ok(()))) {
            self.token.cancel();
        }
        Some(Ended { name, result })
    }

    /// As [`Self::next_or_none`], but waits forever once none is left (like an idle task), for
    /// use in `select!`.
    pub async fn next(&mut self) -> Ended<E> {
        match self.next_or_none().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Names of the tasks still running, sorted.
    pub fn pending(&self) -> Names {
        let mut v: Vec<&'static str> = self.names.values().copied().collect();
        v.sort_unstable();
        Names(v)
    }

    /// Aborts every task and waits until they are gone.
    pub async fn abort_all(&mut self) {
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
        self.names.clear();
    }

    /// Cancels the token and waits for every task until `deadline`. Returns the first failure
    /// (later ones are logged); past the deadline the rest are aborted, named in the log, and
    /// [`TaskError::Unfinished`] is returned.
    pub async fn drain(&mut self, deadline: Instant) -> Result<(), E>
    where
        E: fmt::Display,
    {
        self.token.cancel();
        let mut first: Result<(), E> = Ok(());
        loop {
            match tokio::time::timeout_at(deadline, self.next_or_none()).await {
                Ok(None) => return first,
                Ok(Some(ended)) => {
                    let name = ended.name;
                    if let Err(e) = ended.into_result() {
                        if first.is_ok() {
                            first = Err(e);
                        } else {
                            tracing::warn!(task = name, error = %e, "another task failed while draining");
                        }
                    }
                }
                Err(_) => {
                    let pending = self.pending();
                    tracing::error!(pending = %pending, "tasks did not stop in time; aborting them");
                    self.abort_all().await;
                    return Err(TaskError::Unfinished { pending }.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::time::Duration;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("boom")]
        Boom,
        #[error(transparent)]
        Task(#[from] TaskError),
    }

    fn until_cancelled(t: &CancellationToken) -> impl Future<Output = Result<(), TestError>> {
        let t = t.clone();
        async move {
            t.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_first_failure_cancels_the_rest() {
        let mut tasks = Tasks::<TestError>::new(CancellationToken::new());
        let token = tasks.token().clone();
        tasks.spawn("waiter", until_cancelled(&token));
        tasks.spawn("failing", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(TestError::Boom)
        });
        let first = tasks.next().await;
        assert_eq!(first.name, "failing");
        assert!(matches!(first.into_result(), Err(TestError::Boom)));
        assert!(token.is_cancelled());
        let second = tasks.next().await;
        assert_eq!(second.name, "waiter");
        assert!(second.into_result().is_ok());
        assert!(tasks.next_or_none().await.is_none());
    }

    #[tokio::test]
    async fn a_task_ending_well_cancels_nothing() {
        let mut tasks = Tasks::<TestError>::new(CancellationToken::new());
        tasks.spawn("quick", async { Ok(()) });
        assert!(tasks.next().await.into_result().is_ok());
        assert!(!tasks.token().is_cancelled());
    }

    #[tokio::test]
    async fn drain_aborts_and_names_the_tasks_left_at_the_deadline() {
        let mut tasks = Tasks::<TestError>::new(CancellationToken::new());
        let token = tasks.token().clone();
        tasks.spawn("obedient", until_cancelled(&token));
        tasks.spawn("stubborn b", std::future::pending());
        tasks.spawn("stubborn a", std::future::pending());
        let started = Instant::now();
        let r = tasks.drain(started + Duration::from_millis(100)).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        match r {
            Err(TestError::Task(TaskError::Unfinished { pending })) => {
                assert_eq!(pending, Names(vec!["stubborn a", "stubborn b"]));
                assert_eq!(pending.to_string(), "stubborn a, stubborn b");
            }
            other => panic!("{other:?}"),
        }
        assert!(tasks.pending().0.is_empty());
        assert!(tasks.next_or_none().await.is_none());
    }

    #[tokio::test]
    async fn drain_returns_the_first_failure() {
        let mut tasks = Tasks::<TestError>::new(CancellationToken::new());
        let token = tasks.token().clone();
        tasks.spawn("obedient", until_cancelled(&token));
        tasks.spawn("fails on stop", {
            let t = token.clone();
            async move {
                t.cancelled().await;
                Err(TestError::Boom)
            }
        });
        let r = tasks.drain(Instant::now() + Duration::from_secs(10)).await;
        assert!(matches!(r, Err(TestError::Boom)), "{r:?}");
    }

    #[tokio::test]
    async fn a_panic_keeps_its_cause() {
        let mut tasks = Tasks::<TestError>::new(CancellationToken::new());
        tasks.spawn("panicking", async { panic!("on purpose") });
        let ended = tasks.next().await;
        assert!(tasks.token().is_cancelled());
        match ended.into_result() {
            Err(TestError::Task(
                e @ TaskError::Join {
                    name: "panicking", ..
                },
            )) => {
                let cause = e.source().and_then(|s| s.downcast_ref::<JoinError>());
                assert!(cause.is_some_and(JoinError::is_panic), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}
