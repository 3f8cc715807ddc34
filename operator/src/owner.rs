//! The operator's own Deployment as the owner of what the operator creates in its namespace for
//! itself: the leader Lease and the self-managed webhook certificate Secret. Deleting the
//! Deployment (`helm uninstall` does) then has the garbage collector delete them too, as it
//! deletes a gateway's rendered objects with the AIGateway. A Lease or Secret that a replica
//! still writes after the Deployment is gone names the gone uid, so it is collected as well.
//!
//! Not `controller` and not `blockOwnerDeletion`: the Deployment's deletion never waits for
//! them, and no `deployments/finalizers` permission is needed. Where the
//! OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift, hardened clusters),
//! an update that changes an object's ownerReferences needs `delete` on that object (a create
//! does not): the chart grants it on the Lease and the certificate Secret by name. Without it
//! the adoption is refused, and [`write_adopting`] writes the object without it: the operator
//! works on, only `helm uninstall` leaves that object behind.
//!
//! The Deployment is read again before each reference is written ([`Adopter`]): one deleted
//! with `--cascade=orphan` and made again (or replaced by `helm upgrade --force`) has a new uid,
//! and a reference to the old one would have the garbage collector delete the Lease under a
//! live leader. For the same reason a stored object is not adopted while no Deployment exists.

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Api, Client};
use tokio::time::Instant;

/// How long after a refused (or unfinished) adoption the next one is tried.
pub const ADOPT_RETRY: Duration = Duration::from_secs(300);
/// How long after finding no Deployment (or one being deleted) an adoption is tried again.
const GONE_RETRY: Duration = Duration::from_secs(15);

/// The reference to Deployment `name` in `namespace` (the namespace of the objects it is to
/// own: the garbage collector deletes a dependent whose namespaced owner is not in its own
/// namespace); `None` if there is no such Deployment, or it is being deleted.
pub async fn deployment(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<OwnerReference>, kube::Error> {
    read(&Api::namespaced(client.clone(), namespace), name).await
}

async fn read(
    deployments: &Api<Deployment>,
    name: &str,
) -> Result<Option<OwnerReference>, kube::Error> {
    let found = deployments.get_opt(name).await?;
    // One being deleted owns nothing new: the garbage collector would delete what it gets.
    Ok(found
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .and_then(|d| {
            Some(OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: d.metadata.name?,
                uid: d.metadata.uid?,
                ..OwnerReference::default()
            })
        }))
}

/// Makes `owner` an owner of the object of `meta`, in place of a reference to another object of
/// the same kind and name (a Deployment deleted and made again has a new uid). Returns whether
/// the references changed; other owners are kept.
pub fn adopt(meta: &mut ObjectMeta, owner: &OwnerReference) -> bool {
    let refs = meta.owner_references.get_or_insert_with(Vec::new);
    if refs.iter().any(|r| r.uid == owner.uid) {
        return false;
    }
    refs.retain(|r| !(r.kind == owner.kind && r.name == owner.name));
    refs.push(owner.clone());
    true
}

/// Whether a write was refused as a request (forbidden, invalid), not lost to a conflict, a
/// missing object or the connection: one that also changed ownerReferences may go through
/// without that change.
pub fn is_refusal(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 403 | 422))
}

/// Keeps one object of the operator's namespace (a Lease, a Secret) owned by the operator's
/// Deployment: reads the Deployment again before writing a reference to it, and after a refused
/// adoption writes none for [`ADOPT_RETRY`], warning once.
#[derive(Debug)]
pub struct Adopter {
    deployments: Api<Deployment>,
    /// The object, for logs (`Lease sidegate-operator`).
    object: String,
    state: Mutex<AdopterState>,
}

#[derive(Debug)]
struct AdopterState {
    /// The Deployment as last read.
    owner: OwnerReference,
    /// No adoption before this.
    next_try: Option<Instant>,
    /// A refusal was logged as a warning (once per process).
    warned: bool,
}

impl Adopter {
    /// Keeps `object` (for logs) in `namespace` owned by the Deployment `owner` refers to (in
    /// the same namespace).
    pub fn new(client: Client, namespace: &str, owner: OwnerReference, object: String) -> Self {
        Self {
            deployments: Api::namespaced(client, namespace),
            object,
            state: Mutex::new(AdopterState {
                owner,
                next_try: None,
                warned: false,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, AdopterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ownerReferences to write into the object of `meta` in place of its own (for an object
    /// about to be created, its new metadata): with the Deployment, read again, when the object
    /// lacks the reference last known and, for a stored object, no refusal is recent (a create
    /// is never refused for its owner). `None`: leave them as they are.
    pub async fn adoption(&self, meta: &ObjectMeta) -> Option<Vec<OwnerReference>> {
        let now = Instant::now();
        let stored = meta.resource_version.is_some();
        let known = {
            let mut state = self.state();
            let has_it = meta
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.uid == state.owner.uid);
            if has_it || (stored && state.next_try.is_some_and(|t| now < t)) {
                return None;
            }
            // Counted as refused until it is done: an attempt cut off midway (a renewal's
            // timeout drops it) must not hold up the next one with the same read.
            if stored {
                state.next_try = Some(now + ADOPT_RETRY);
            }
            state.owner.clone()
        };
        let owner = match read(&self.deployments, &known.name).await {
            Ok(Some(current)) => {
                if current.uid != known.uid {
                    tracing::info!(
                        deployment = %current.name,
                        uid = %current.uid,
                        previous = %known.uid,
                        "the operator's Deployment was made again; owning by its new uid"
                    );
                }
                self.state().owner = current.clone();
                current
            }
            // Gone, or being deleted: a new object names the uid last read, so that what a
            // replica still draining after `helm uninstall` makes is collected too. A stored one
            // is left as it is: a dead owner would have the garbage collector delete it, such
            // as the Lease of a live leader whose Deployment is being made again
            // (`--cascade=orphan`, `helm upgrade --force`); asked again soon.
            Ok(None) if stored => {
                self.state().next_try = Some(now + GONE_RETRY);
                return None;
            }
            Ok(None) => known,
            Err(e) => {
                tracing::debug!(deployment = %known.name, error = %e, "could not read the operator's Deployment");
                if stored {
                    return None;
                }
                known
            }
        };
        let mut meta = ObjectMeta {
            owner_references: meta.owner_references.clone(),
            ..ObjectMeta::default()
        };
        if adopt(&mut meta, &owner) {
            meta.owner_references
        } else {
            self.state().next_try = None;
            None
        }
    }

    /// The adopting write of the object of `meta` succeeded (a create says nothing of updates).
    fn adopted(&self, meta: &ObjectMeta) {
        if meta.resource_version.is_some() {
            let mut state = self.state();
            state.next_try = None;
            tracing::info!(
                object = %self.object,
                owner = %state.owner.name,
                uid = %state.owner.uid,
                "now owned by the operator's Deployment"
            );
        }
    }

    /// The adopting write was refused with `error` (the object was written without it).
    fn refused(&self, error: &kube::Error) {
        let mut state = self.state();
        state.next_try = Some(Instant::now() + ADOPT_RETRY);
        if std::mem::replace(&mut state.warned, true) {
            tracing::debug!(object = %self.object, error = %error, "adoption refused again");
            return;
        }
        tracing::warn!(
            object = %self.object,
            owner = %state.owner.name,
            error = %error,
            retry_secs = ADOPT_RETRY.as_secs(),
            "could not make the operator's Deployment its owner (written without it, so helm \
             uninstall will leave it); where the OwnerReferencesPermissionEnforcement admission \
             plugin runs this needs `delete` on it, which the chart grants by name"
        );
    }
}

/// Makes a write of the object of `meta` that also adopts it when [`Adopter::adoption`] says
/// so: `write(Some(ownerReferences))`, and if that is refused ([`is_refusal`]), the same write
/// without the change, `write(None)`: adopting never stands in the way of the write itself.
pub async fn write_adopting<T, F, Fut>(
    adopter: Option<&Adopter>,
    meta: &ObjectMeta,
    mut write: F,
) -> Result<T, kube::Error>
where
    F: FnMut(Option<Vec<OwnerReference>>) -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let Some(adopter) = adopter else {
        return write(None).await;
    };
    let Some(refs) = adopter.adoption(meta).await else {
        return write(None).await;
    };
    match write(Some(refs)).await {
        Ok(done) => {
            adopter.adopted(meta);
            Ok(done)
        }
        Err(e) if is_refusal(&e) => {
            adopter.refused(&e);
            write(None).await
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn owner(kind: &str, name: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            ..OwnerReference::default()
        }
    }

    #[test]
    fn an_object_without_owners_gets_the_deployment_as_its_owner() {
        let mut meta = ObjectMeta::default();
        let deployment = owner("Deployment", "sidegate-operator", "uid-1");
        assert!(adopt(&mut meta, &deployment));
        assert_eq!(meta.owner_references, Some(vec![deployment.clone()]));
        // Once is enough: nothing to write again.
        assert!(!adopt(&mut meta, &deployment));
        assert_eq!(meta.owner_references, Some(vec![deployment]));
    }

    #[test]
    fn a_re_created_deployment_replaces_the_reference_to_the_deleted_one_and_others_stay() {
        let other = owner("ConfigMap", "sidegate-operator", "uid-cm");
        let mut meta = ObjectMeta {
            owner_references: Some(vec![
                other.clone(),
                owner("Deployment", "sidegate-operator", "uid-old"),
            ]),
            ..ObjectMeta::default()
        };
        let now = owner("Deployment", "sidegate-operator", "uid-new");
        assert!(adopt(&mut meta, &now));
        assert_eq!(meta.owner_references, Some(vec![other, now]));
    }

    /// An apiserver holding Deployment `sidegate-operator` of `uid` (none while it is empty),
    /// counting the reads.
    #[derive(Clone, Default)]
    struct Apiserver {
        uid: Arc<Mutex<String>>,
        reads: Arc<Mutex<usize>>,
    }

    impl Apiserver {
        fn client(&self) -> Client {
            Client::new(self.clone(), "sidegate-system")
        }

        fn set_uid(&self, uid: &str) {
            *self.uid.lock().expect("uid") = uid.into();
        }

        fn reads(&self) -> usize {
            *self.reads.lock().expect("reads")
        }
    }

    impl tower_service::Service<http::Request<kube::client::Body>> for Apiserver {
        type Response = http::Response<kube::client::Body>;
        type Error = kube::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
            assert_eq!(
                request.uri().path(),
                "/apis/apps/v1/namespaces/sidegate-system/deployments/sidegate-operator"
            );
            *self.reads.lock().expect("reads") += 1;
            let uid = self.uid.lock().expect("uid").clone();
            let (status, body) = if uid.is_empty() {
                (
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            } else {
                (
                    200,
                    serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": "sidegate-operator", "namespace": "sidegate-system",
                            "uid": uid}}),
                )
            };
            let response = http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(body.to_string().into_bytes()))
                .expect("response");
            std::future::ready(Ok(response))
        }
    }

    fn adopter(apiserver: &Apiserver, uid: &str) -> Adopter {
        Adopter::new(
            apiserver.client(),
            "sidegate-system",
            owner("Deployment", "sidegate-operator", uid),
            "Lease sidegate-operator".into(),
        )
    }

    /// A stored object owned by the Deployment of `uid`.
    fn owned_by(uid: &str) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![owner("Deployment", "sidegate-operator", uid)]),
            ..unowned()
        }
    }

    /// A stored object without owners.
    fn unowned() -> ObjectMeta {
        ObjectMeta {
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        }
    }

    fn forbidden() -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            message: "cannot set an ownerRef on a resource you can't delete".into(),
            ..kube::core::Status::default()
        }))
    }

    /// The ownerReferences a write of the object of `meta` carries (`None`: unchanged).
    async fn written(adopter: &Adopter, meta: &ObjectMeta) -> Option<Vec<OwnerReference>> {
        write_adopting(Some(adopter), meta, |owners| async move {
            Ok::<_, kube::Error>(owners)
        })
        .await
        .expect("written")
    }

    #[tokio::test]
    async fn the_deployment_is_read_again_before_a_reference_is_written_and_a_gone_one_keeps_its_uid()
     {
        let apiserver = Apiserver::default();
        let now_owned_by = |uid| Some(vec![owner("Deployment", "sidegate-operator", uid)]);
        apiserver.set_uid("uid-1");
        let adopter = adopter(&apiserver, "uid-1");
        // Owned already: nothing read, nothing to change.
        assert_eq!(written(&adopter, &owned_by("uid-1")).await, None);
        assert_eq!(apiserver.reads(), 0);

        // Deleted with --cascade=orphan (the garbage collector took the references away) and
        // made again: the new uid, not the one read at start.
        apiserver.set_uid("uid-2");
        assert_eq!(written(&adopter, &unowned()).await, now_owned_by("uid-2"));
        assert_eq!(apiserver.reads(), 1);
        // An object still naming the old one gets the new one in its place.
        assert_eq!(
            written(&adopter, &owned_by("uid-1")).await,
            now_owned_by("uid-2")
        );
        // A replica that read the old uid at start, meeting an object another replica adopted
        // with the new one: learns it, and leaves the object alone.
        let late = self::adopter(&apiserver, "uid-1");
        assert_eq!(written(&late, &owned_by("uid-2")).await, None);
        assert_eq!(written(&late, &owned_by("uid-2")).await, None);
        assert_eq!(apiserver.reads(), 3, "read once more, by that replica");

        // Gone (helm uninstall, a replica still draining): what it creates names the last uid
        // read, so that it is collected too; a stored object is left as it is (the Deployment
        // may be on its way back), and asked about again soon.
        apiserver.set_uid("");
        assert_eq!(
            written(&late, &ObjectMeta::default()).await,
            now_owned_by("uid-2")
        );
        assert_eq!(written(&late, &unowned()).await, None);
        let reads = apiserver.reads();
        assert_eq!(written(&late, &unowned()).await, None);
        assert_eq!(apiserver.reads(), reads, "not asked again at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_adoption_leaves_the_write_through_without_it_and_is_tried_again_later() {
        let apiserver = Apiserver::default();
        apiserver.set_uid("uid-1");
        let adopter = adopter(&apiserver, "uid-1");
        let unowned = unowned();
        // The write refuses a change of ownerReferences, as the admission plugin does without
        // `delete`; records what each attempt carried.
        let writes = Mutex::new(Vec::new());
        let renew = |refused: bool| {
            let writes = &writes;
            write_adopting(Some(&adopter), &unowned, move |refs| {
                let adopting = refs.is_some();
                writes.lock().expect("writes").push(adopting);
                async move {
                    if adopting && refused {
                        Err(forbidden())
                    } else {
                        Ok(())
                    }
                }
            })
        };
        renew(true).await.expect("written without the owner");
        assert_eq!(
            writes.lock().expect("writes").drain(..).collect::<Vec<_>>(),
            [true, false]
        );
        // The renewals that follow do not ask again (nor read the Deployment) for a while...
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(5)).await;
            renew(true).await.expect("written");
        }
        assert_eq!(
            writes.lock().expect("writes").drain(..).collect::<Vec<_>>(),
            [false; 3]
        );
        assert_eq!(apiserver.reads(), 1);
        // A create meanwhile (the object was deleted) carries the owner: creates are not refused
        // for it. Updates still wait.
        assert_eq!(
            written(&adopter, &ObjectMeta::default()).await,
            Some(vec![owner("Deployment", "sidegate-operator", "uid-1")])
        );
        renew(true).await.expect("written");
        assert_eq!(
            writes.lock().expect("writes").drain(..).collect::<Vec<_>>(),
            [false]
        );
        // ...then do, and once `delete` is granted the adoption goes through.
        tokio::time::advance(ADOPT_RETRY).await;
        renew(false).await.expect("written with the owner");
        assert_eq!(
            writes.lock().expect("writes").drain(..).collect::<Vec<_>>(),
            [true]
        );

        // A failure that is no refusal (the connection) is the write's own: reported.
        let failed = write_adopting(
            Some(&self::adopter(&apiserver, "uid-1")),
            &unowned,
            |_| async { Err::<(), _>(kube::Error::Service("connection reset".into())) },
        )
        .await;
        assert!(matches!(failed, Err(kube::Error::Service(_))));
    }

    #[test]
    fn only_refusals_of_the_request_are_retried_without_the_adoption() {
        let api = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            }))
        };
        for code in [400, 403, 422] {
            assert!(is_refusal(&api(code)), "{code}");
        }
        for code in [404, 409, 429, 500, 503] {
            assert!(!is_refusal(&api(code)), "{code}");
        }
        assert!(!is_refusal(&kube::Error::Service("timeout".into())));
    }
}
