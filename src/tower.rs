//! The pool as a [`tower::Service`](tower_service::Service), for axum,
//! tonic and any other tower stack (feature `tower`, on by default; it
//! adds only the dependency-free `tower-service` crate).
//!
//! Each provider is itself a tower service (a client with the provider's
//! base URL and key layered on, say). A request is cloned for every
//! attempt, as tower's own `Retry` does, so the request type must be
//! `Clone`: buffer the body first (`http::Request<Bytes>`, a tonic
//! message). The model comes from the request through a function you
//! pass. Each attempt waits for its provider's `poll_ready` and then
//! calls it; its error is classified like any pool operation's (the error
//! type's own [`Classify`](crate::Classify), or the builder's
//! [`classifier`](crate::PoolBuilder::classifier)).
//!
//! `poll_ready` is always ready: admission, budgets and deadlines are the
//! pool's per request, inside the call, and a provider's own readiness is
//! awaited per attempt. Put tower's concurrency or load-shed layers in
//! front of the pool service to bound the requests in flight.
//!
//! ```
//! use std::convert::Infallible;
//! use retryctl::Pool;
//! use tower::{Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Two providers; a request is (model, prompt).
//! let provider = |name: &'static str| service_fn(move |(_, prompt): (String, String)| async move {
//!     Ok::<_, std::io::Error>(format!("{name}: {prompt}"))
//! });
//! let mut service = Pool::builder()
//!     .provider("m", "a", provider("a"))
//!     .provider("m", "b", provider("b"))
//!     .build()
//!     .unwrap()
//!     .into_service(|(model, _): &(String, String)| model.as_str());
//! let answer = service.ready().await.unwrap().call(("m".into(), "hi".into())).await.unwrap();
//! assert_eq!(answer, "a: hi");
//! # let _: Option<Infallible> = None;
//! # }
//! ```

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::classifier::Classifier;
use crate::pool::{Pool, PoolError};

/// A [`Pool`] whose providers are tower services, served as one tower
/// service: see the [module docs](self). Cheap to clone (an `Arc`).
pub struct PoolService<P, M, C = crate::DefaultClassifier> {
    pool: Arc<Pool<P, C>>,
    model_of: Arc<M>,
}

impl<P, M, C> Clone for PoolService<P, M, C> {
    fn clone(&self) -> Self {
        PoolService {
            pool: self.pool.clone(),
            model_of: self.model_of.clone(),
        }
    }
}

impl<P, M, C> fmt::Debug for PoolService<P, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolService")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl<P, M, C> PoolService<P, M, C> {
    /// The pool behind the service (its stats, its policy handle).
    pub fn pool(&self) -> &Pool<P, C> {
        &self.pool
    }
}

impl<P, C> Pool<P, C> {
    /// This pool as a tower service; `model_of` names the model a request
    /// is for (a name the pool does not serve fails with
    /// [`FailReason::UnknownModel`](crate::FailReason::UnknownModel)).
    pub fn into_service<Req, M>(self, model_of: M) -> PoolService<P, M, C>
    where
        M: for<'r> Fn(&'r Req) -> &'r str,
    {
        PoolService {
            pool: Arc::new(self),
            model_of: Arc::new(model_of),
        }
    }
}

/// The future of one request through a [`PoolService`].
pub type ResponseFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, PoolError<E>>> + Send>>;

impl<P, M, C, Req> Service<Req> for PoolService<P, M, C>
where
    P: Service<Req> + Clone + Send + Sync + 'static,
    P::Future: Send,
    P::Response: Send + 'static,
    P::Error: fmt::Display + Send + 'static,
    C: Classifier<P::Error> + Send + Sync + 'static,
    M: for<'r> Fn(&'r Req) -> &'r str + Send + Sync + 'static,
    Req: Clone + Send + Sync + 'static,
{
    type Response = P::Response;
    type Error = PoolError<P::Error>;
    type Future = ResponseFuture<P::Response, P::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let pool = self.pool.clone();
        let model_of = self.model_of.clone();
        Box::pin(async move {
            let model = model_of(&request);
            let served = pool
                .call(model, |provider: &P| {
                    let mut provider = provider.clone();
                    let request = request.clone();
                    async move {
                        poll_fn(|cx| provider.poll_ready(cx)).await?;
                        provider.call(request).await
                    }
                })
                .await?;
            Ok(served.value)
        })
    }
}
