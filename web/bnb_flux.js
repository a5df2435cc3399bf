// Frontend extension of comfyui-bnb-flux (grows with the "pack as users meet it" work).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfyui-bnb-flux",
});
