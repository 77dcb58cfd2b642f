//! CRI `ImageService`: one short handler per RPC over [`vmpod_images::ImageStore`].
//!
//! The store's synchronous calls (metadata reads, directory walks) run on
//! the blocking pool so a slow disk never stalls the gRPC executor.

use std::path::PathBuf;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};
use vmpod_images::{FsUsage, ImageFilter, ImageStore};

use crate::{convert, status};

pub struct ImageSvc {
    store: Arc<ImageStore>,
    /// Where container writable layers will live (reported in `ImageFsInfo`).
    containers_dir: PathBuf,
}

impl ImageSvc {
    pub fn new(store: Arc<ImageStore>, containers_dir: PathBuf) -> Self {
        ImageSvc {
            store,
            containers_dir,
        }
    }

    /// Run a synchronous store call on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ImageStore) -> vmpod_images::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(status::join_error)?
            .map_err(status::image_error)
    }
}

/// The request's `image.image`, trimmed; `InvalidArgument` if absent or blank.
fn required_image(spec: Option<&cri::ImageSpec>) -> Result<String, Status> {
    convert::image_name(spec).ok_or_else(|| status::missing("image.image"))
}

#[tonic::async_trait]
impl ImageService for ImageSvc {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let name = req
            .into_inner()
            .filter
            .and_then(|f| convert::image_name(f.image.as_ref()));
        // A bare repository (`busybox`, no tag or digest) also matches every
        // tag of that repository, as `docker images busybox` does.
        let repo = name.as_deref().and_then(convert::bare_repository);
        let filter = ImageFilter { image: name };
        let records = self
            .blocking(move |s| {
                let mut found = s.list(&filter)?;
                if let Some(repo) = repo {
                    for r in s.list(&ImageFilter::default())? {
                        if convert::in_repository(&r, &repo) && !found.iter().any(|f| f.id == r.id)
                        {
                            found.push(r);
                        }
                    }
                }
                Ok(found)
            })
            .await?;
        tracing::debug!(count = records.len(), "listed images");
        Ok(Response::new(cri::ListImagesResponse {
            images: records.iter().map(convert::image).collect(),
        }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = required_image(req.image.as_ref())?;
        tracing::debug!(image = %name, "image status");
        // Absent → empty response (CRI), not an error.
        let Some(record) = self.blocking(move |s| s.status(&name)).await? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let info = if req.verbose {
            convert::image_verbose_info(&record)
        } else {
            Default::default()
        };
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(convert::image(&record)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = required_image(req.image.as_ref())?;
        let auth = convert::auth(req.auth);
        tracing::info!(image = %name, with_auth = auth.is_some(), "pulling image");
        let record = self.store.pull(&name, auth).await.map_err(|e| {
            tracing::warn!(image = %name, error = %e, "pull failed");
            status::image_error(e)
        })?;
        tracing::info!(image = %name, id = %record.id, size = record.size, "pulled image");
        Ok(Response::new(cri::PullImageResponse {
            image_ref: record.id,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = required_image(req.into_inner().image.as_ref())?;
        tracing::info!(image = %name, "removing image");
        // Absent → Ok (CRI: idempotent); the store implements that.
        self.blocking(move |s| s.remove(&name)).await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let images = self.blocking(|s| s.fs_usage()).await?;
        let dir = self.containers_dir.clone();
        let containers = tokio::task::spawn_blocking(move || FsUsage::measure(&dir))
            .await
            .map_err(status::join_error)?
            .map_err(|e| {
                Status::internal(format!("measuring {}: {e}", self.containers_dir.display()))
            })?;
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![convert::fs_usage(self.store.root(), images)],
            container_filesystems: vec![convert::fs_usage(&self.containers_dir, containers)],
        }))
    }
}
